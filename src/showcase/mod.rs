//! The showcase, not part of the library's API: the demo `dirtyvm` runs by default, the
//! benchmark scenarios `benches/scenarios.rs` prints, and the SVG plots they draw.

pub mod demo;
pub mod plot;
pub mod scenario;
