//! The showcase, not part of the library's API: the demo `dirtyvm` runs by default, the
//! benchmark scenarios `benches/scenarios.rs` and `benches/migration.rs` print, and the SVG
//! plots they draw.

pub mod demo;
pub mod migration;
pub mod plot;
pub mod scenario;
