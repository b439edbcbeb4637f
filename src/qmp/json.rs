//! QEMU's JSON dialect: read as QEMU 7.2 reads a QMP stream, written as QEMU writes replies.
//!
//! QEMU's lexer is a byte-driven state machine (`qobject/json-lexer.c`); its streamer
//! (`json-streamer.c`) collects tokens until the brackets balance and hands them to a
//! recursive-descent parser (`json-parser.c`). Reproducing the three, rather than reading with
//! serde_json, is what gives a client QEMU's answers to bad input: one error per bad
//! top-level token (`not json` is two errors), the lexer's resynchronization after a lexical
//! error (skip to a structural character or a control character such as a newline), QEMU's
//! extensions (single-quoted strings, the `\'` escape, `\u0000`) and its strictness
//! (duplicate keys, noncharacters and overlong UTF-8 are errors).

use std::collections::VecDeque;
use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};
use serde_json::{Map, Number, Value};

/// The most token bytes one message may hold before the client is dropped. QEMU allows
/// 64 MiB and carries on; no command needs more than a few hundred bytes, and the bound caps
/// what a client can make the VMM buffer. It also implies QEMU's limit of 2 Mi tokens.
pub(super) const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// QEMU's `MAX_NESTING`: brackets and braces open at once. It also bounds the parser's
/// recursion.
const MAX_NESTING: i64 = 1 << 10;

/// QEMU formats parser errors into a 1024-byte buffer, so long ones come out cut.
const MAX_PARSE_ERROR_LEN: usize = 1023;

/// What the stream yields, in input order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Message {
    /// A complete top-level value.
    Value(Value),
    /// A lexical or syntax error with QEMU's text; reading carries on after it.
    Error(String),
    /// The message outgrew [`MAX_MESSAGE_BYTES`]; nothing more is read.
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// A token of the unfinished message; its text is `text[start..end]` of the stream.
#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// The lexer states of `json-lexer.c` (without interpolation, which QMP does not enable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After a lexical error: skipping to a point where the stream can resynchronize.
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
    Start,
}

/// A lexer transition.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// The token goes on.
    Continue(State),
    /// Whitespace or skipped input: no token.
    Discard(State),
    /// A token ends.
    Emit(Kind),
    /// A lexical error, reported with the token so far (the bad byte included).
    Stray,
}

/// The transition table of `json-lexer.c`, and whether the byte is consumed (`false` for the
/// lookahead transitions, which end a token and then lex the byte again from the start).
fn transition(state: State, byte: u8) -> (Next, bool) {
    use Next::{Continue, Discard, Emit, Stray};
    let digit = byte.is_ascii_digit();
    match state {
        State::Recovery => match byte {
            b'\t' => (Discard(State::Recovery), true),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => {
                (Discard(State::Start), false)
            }
            _ => (Discard(State::Recovery), true),
        },
        State::DqString | State::SqString => {
            let (quote, escape) = if state == State::DqString {
                (b'"', State::DqEscape)
            } else {
                (b'\'', State::SqEscape)
            };
            match byte {
                b'\\' => (Continue(escape), true),
                _ if byte == quote => (Emit(Kind::String), true),
                0x20..=0xfd => (Continue(state), true),
                _ => (Stray, true),
            }
        }
        State::DqEscape | State::SqEscape => match byte {
            // Which escapes are valid is the parser's business.
            0x20..=0xfd if state == State::DqEscape => (Continue(State::DqString), true),
            0x20..=0xfd => (Continue(State::SqString), true),
            _ => (Stray, true),
        },
        State::Zero => match byte {
            _ if digit => (Stray, true),
            b'.' => (Continue(State::Mantissa), true),
            _ => (Emit(Kind::Integer), false),
        },
        State::ExpDigits if digit => (Continue(State::ExpDigits), true),
        State::ExpDigits => (Emit(Kind::Float), false),
        State::ExpSign if digit => (Continue(State::ExpDigits), true),
        State::ExpE => match byte {
            b'-' | b'+' => (Continue(State::ExpSign), true),
            _ if digit => (Continue(State::ExpDigits), true),
            _ => (Stray, true),
        },
        State::MantissaDigits => match byte {
            _ if digit => (Continue(State::MantissaDigits), true),
            b'e' | b'E' => (Continue(State::ExpE), true),
            _ => (Emit(Kind::Float), false),
        },
        State::Mantissa if digit => (Continue(State::MantissaDigits), true),
        State::Digits => match byte {
            _ if digit => (Continue(State::Digits), true),
            b'e' | b'E' => (Continue(State::ExpE), true),
            b'.' => (Continue(State::Mantissa), true),
            _ => (Emit(Kind::Integer), false),
        },
        State::Sign => match byte {
            b'0' => (Continue(State::Zero), true),
            b'1'..=b'9' => (Continue(State::Digits), true),
            _ => (Stray, true),
        },
        State::Keyword if byte.is_ascii_lowercase() => (Continue(State::Keyword), true),
        State::Keyword => (Emit(Kind::Keyword), false),
        State::Start => match byte {
            b'"' => (Continue(State::DqString), true),
            b'\'' => (Continue(State::SqString), true),
            b'0' => (Continue(State::Zero), true),
            b'1'..=b'9' => (Continue(State::Digits), true),
            b'-' => (Continue(State::Sign), true),
            b'{' => (Emit(Kind::LCurly), true),
            b'}' => (Emit(Kind::RCurly), true),
            b'[' => (Emit(Kind::LSquare), true),
            b']' => (Emit(Kind::RSquare), true),
            b',' => (Emit(Kind::Comma), true),
            b':' => (Emit(Kind::Colon), true),
            b'a'..=b'z' => (Continue(State::Keyword), true),
            b' ' | b'\t' | b'\r' | b'\n' => (Discard(State::Start), true),
            _ => (Stray, true),
        },
        State::ExpSign | State::Mantissa => (Stray, true),
    }
}

/// A QMP input stream: bytes in, [`Message`]s out.
#[derive(Debug)]
pub(super) struct JsonStream {
    state: State,
    /// The token being lexed.
    token: Vec<u8>,
    /// The tokens of the unfinished top-level value.
    tokens: Vec<Token>,
    /// Their text, back to back: its length is QEMU's `token_size`.
    text: Vec<u8>,
    brace_count: i64,
    bracket_count: i64,
    messages: VecDeque<Message>,
    too_long: bool,
}

impl JsonStream {
    pub(super) fn new() -> JsonStream {
        JsonStream {
            state: State::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            text: Vec::new(),
            brace_count: 0,
            bracket_count: 0,
            messages: VecDeque::new(),
            too_long: false,
        }
    }

    /// Reads one byte; any messages it completes are then ready for [`JsonStream::message`].
    pub(super) fn feed(&mut self, byte: u8) {
        if self.too_long {
            return;
        }
        loop {
            let (next, consumed) = transition(self.state, byte);
            if consumed {
                self.token.push(byte);
            }
            match next {
                Next::Continue(state) => self.state = state,
                Next::Discard(state) => {
                    self.token.clear();
                    self.state = state;
                }
                Next::Emit(kind) => {
                    self.end_token(kind);
                    self.state = State::Start;
                }
                Next::Stray => {
                    let stray = String::from_utf8_lossy(&self.token);
                    let message = Message::Error(format!("JSON parse error, stray '{stray}'"));
                    self.token.clear();
                    self.end_message(message);
                    self.state = State::Recovery;
                }
            }
            // A lookahead transition always lands in `Start`, which consumes every byte.
            if consumed {
                break;
            }
        }
        if self.text.len() + self.token.len() > MAX_MESSAGE_BYTES {
            self.too_long = true;
            self.messages.push_back(Message::TooLong);
        }
    }

    /// The next complete message, if any.
    pub(super) fn message(&mut self) -> Option<Message> {
        self.messages.pop_front()
    }

    /// `json_message_process_token()`.
    fn end_token(&mut self, kind: Kind) {
        match kind {
            Kind::LCurly => self.brace_count += 1,
            Kind::RCurly => self.brace_count -= 1,
            Kind::LSquare => self.bracket_count += 1,
            Kind::RSquare => self.bracket_count -= 1,
            _ => {}
        }
        if self.brace_count + self.bracket_count > MAX_NESTING {
            self.token.clear();
            self.end_message(Message::Error("JSON nesting depth limit exceeded".into()));
            return;
        }
        let start = self.text.len();
        self.text.append(&mut self.token);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        // QEMU 7.2 tests bracket_count twice and brace_count never here, so a stray '}'
        // inside an array keeps collecting; copied, because it decides which error such
        // input gets.
        if (self.brace_count > 0 || self.bracket_count > 0) && self.bracket_count >= 0 {
            return;
        }
        let message = match (Parser {
            tokens: &self.tokens,
            text: &self.text,
            next: 0,
            error: None,
        })
        .parse()
        {
            Ok(value) => Message::Value(value),
            Err(error) => Message::Error(error),
        };
        self.end_message(message);
    }

    /// Emits a message and starts collecting the next.
    fn end_message(&mut self, message: Message) {
        self.messages.push_back(message);
        self.tokens.clear();
        self.text.clear();
        self.brace_count = 0;
        self.bracket_count = 0;
    }
}

/// `json-parser.c` over the tokens of one message. As in QEMU, the first error wins: callers
/// up the recursion add their own complaint, which is dropped.
struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    next: usize,
    error: Option<String>,
}

impl<'a> Parser<'a> {
    fn parse(mut self) -> Result<Value, String> {
        match self.value() {
            Some(value) => Ok(value),
            None => Err(self.error.unwrap_or_default()),
        }
    }

    fn fail<T>(&mut self, message: &str) -> Option<T> {
        if self.error.is_none() {
            let mut end = message.len().min(MAX_PARSE_ERROR_LEN);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            self.error = Some(format!("JSON parse error, {}", &message[..end]));
        }
        None
    }

    fn peek(&self) -> Option<Kind> {
        self.tokens.get(self.next).map(|token| token.kind)
    }

    fn pop(&mut self) -> Option<Kind> {
        let kind = self.peek();
        self.next += 1;
        kind
    }

    fn value(&mut self) -> Option<Value> {
        let Some(&token) = self.tokens.get(self.next) else {
            return self.fail("premature EOI");
        };
        let text: &'a [u8] = self.text;
        let text = &text[token.start..token.end];
        match token.kind {
            Kind::LCurly => self.object(),
            Kind::LSquare => self.array(),
            Kind::String => {
                self.next += 1;
                self.string(text).map(Value::String)
            }
            Kind::Integer | Kind::Float => {
                self.next += 1;
                Some(number(
                    &String::from_utf8_lossy(text),
                    token.kind == Kind::Integer,
                ))
            }
            Kind::Keyword => {
                self.next += 1;
                match text {
                    b"true" => Some(Value::Bool(true)),
                    b"false" => Some(Value::Bool(false)),
                    b"null" => Some(Value::Null),
                    _ => self.fail(&format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(text)
                    )),
                }
            }
            Kind::RCurly | Kind::RSquare | Kind::Colon | Kind::Comma => {
                self.fail("expecting value")
            }
        }
    }

    fn object(&mut self) -> Option<Value> {
        self.next += 1;
        let mut members = Map::new();
        match self.peek() {
            None => return self.fail("premature EOI"),
            Some(Kind::RCurly) => {
                self.next += 1;
                return Some(Value::Object(members));
            }
            Some(_) => self.pair(&mut members)?,
        }
        loop {
            match self.pop() {
                None => return self.fail("premature EOI"),
                Some(Kind::RCurly) => return Some(Value::Object(members)),
                Some(Kind::Comma) => self.pair(&mut members)?,
                Some(_) => return self.fail("expected separator in dict"),
            }
        }
    }

    fn pair(&mut self, members: &mut Map<String, Value>) -> Option<()> {
        if self.peek().is_none() {
            return self.fail("premature EOI");
        }
        let Some(Value::String(key)) = self.value() else {
            return self.fail("key is not a string in object");
        };
        match self.pop() {
            None => return self.fail("premature EOI"),
            Some(Kind::Colon) => {}
            Some(_) => return self.fail("missing : in object pair"),
        }
        let Some(value) = self.value() else {
            return self.fail("Missing value in dict");
        };
        if members.contains_key(&key) {
            return self.fail("duplicate key");
        }
        members.insert(key, value);
        Some(())
    }

    fn array(&mut self) -> Option<Value> {
        self.next += 1;
        let mut elements = Vec::new();
        match self.peek() {
            None => return self.fail("premature EOI"),
            Some(Kind::RSquare) => {
                self.next += 1;
                return Some(Value::Array(elements));
            }
            Some(_) => elements.push(self.element()?),
        }
        loop {
            match self.pop() {
                None => return self.fail("premature EOI"),
                Some(Kind::RSquare) => return Some(Value::Array(elements)),
                Some(Kind::Comma) => elements.push(self.element()?),
                Some(_) => return self.fail("expected separator in list"),
            }
        }
    }

    fn element(&mut self) -> Option<Value> {
        match self.value() {
            Some(value) => Some(value),
            None => self.fail("expecting value"),
        }
    }

    /// `parse_string()`: a quoted token, quotes included, in QEMU's modified UTF-8.
    fn string(&mut self, token: &[u8]) -> Option<String> {
        let quote = token.first().copied();
        let mut decoded = String::new();
        let mut at = 1;
        while let Some(&byte) = token.get(at) {
            if Some(byte) == quote {
                break;
            }
            if byte != b'\\' {
                let Some((c, len)) = mod_utf8_char(&token[at..]) else {
                    return self.fail("invalid UTF-8 sequence in string");
                };
                decoded.push(c);
                at += len;
                continue;
            }
            let escape_start = at;
            at += 2;
            let unescaped = match token.get(escape_start + 1) {
                Some(b'"') => '"',
                Some(b'\'') => '\'',
                Some(b'\\') => '\\',
                Some(b'/') => '/',
                Some(b'b') => '\u{8}',
                Some(b'f') => '\u{c}',
                Some(b'n') => '\n',
                Some(b'r') => '\r',
                Some(b't') => '\t',
                Some(b'u') => {
                    let mut codepoint = hex4(token, at);
                    at += 4;
                    if (0xd800..=0xdbff).contains(&codepoint)
                        && token.get(at) == Some(&b'\\')
                        && token.get(at + 1) == Some(&b'u')
                    {
                        let trailing = hex4(token, at + 2);
                        codepoint = if (0xdc00..=0xdfff).contains(&trailing) {
                            at += 6;
                            0x10000 + ((codepoint & 0x3ff) << 10) + (trailing & 0x3ff)
                        } else {
                            -1
                        };
                    }
                    let Some(c) = unicode_char(codepoint) else {
                        // QEMU prints the escape with `%.*s`, which stops at the token's end.
                        let shown = &token[escape_start..at.min(token.len())];
                        return self.fail(&format!(
                            "{} is not a valid Unicode character",
                            String::from_utf8_lossy(shown)
                        ));
                    };
                    c
                }
                _ => return self.fail("invalid escape sequence in string"),
            };
            decoded.push(unescaped);
        }
        Some(decoded)
    }
}

/// A number token as QEMU represents it: int64 if it fits, else uint64, else a double.
fn number(text: &str, integer: bool) -> Value {
    if integer {
        if let Ok(n) = text.parse::<i64>() {
            return n.into();
        }
        if let Ok(n) = text.parse::<u64>() {
            return n.into();
        }
    }
    // serde_json has no infinity; `null` fails every typed argument check the same way.
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Four hex digits at `at`, or -1 (`cvt4hex()`).
fn hex4(token: &[u8], at: usize) -> i64 {
    let mut value = 0;
    for offset in 0..4 {
        match token
            .get(at + offset)
            .and_then(|&digit| char::from(digit).to_digit(16))
        {
            Some(digit) => value = (value << 4) | i64::from(digit),
            None => return -1,
        }
    }
    value
}

/// QEMU's `is_valid_codepoint()`: Unicode scalar values that are not noncharacters.
fn unicode_char(codepoint: i64) -> Option<char> {
    let codepoint = u32::try_from(codepoint).ok()?;
    let noncharacter = (0xfdd0..=0xfdef).contains(&codepoint) || codepoint & 0xfffe == 0xfffe;
    if noncharacter {
        return None;
    }
    char::from_u32(codepoint)
}

/// `mod_utf8_codepoint()`: the character at the start of `bytes` and its length in bytes.
/// Modified UTF-8 is UTF-8 with U+0000 also written as the overlong `C0 80`.
fn mod_utf8_char(bytes: &[u8]) -> Option<(char, usize)> {
    const MIN_CODEPOINT: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];
    let &lead = bytes.first()?;
    if lead < 0x80 {
        return Some((char::from(lead), 1));
    }
    if lead >= 0xfe || lead & 0x40 == 0 {
        return None;
    }
    let len = lead.leading_ones() as usize;
    let mut codepoint = u32::from(lead & (0xff >> (len + 1)));
    for offset in 1..len {
        let byte = bytes.get(offset).copied().unwrap_or(0);
        if byte & 0xc0 != 0x80 {
            return None;
        }
        codepoint = (codepoint << 6) | u32::from(byte & 0x3f);
    }
    let c = unicode_char(i64::from(codepoint))?;
    let overlong = codepoint < MIN_CODEPOINT[len - 2] && !(codepoint == 0 && len == 2);
    (!overlong).then_some((c, len))
}

/// One reply or event as a line of QEMU's output (`qobject/json-writer.c`): `": "` and
/// `", "` separators, every character outside printable ASCII as a `\uXXXX` escape.
pub(super) fn to_line(value: &Value) -> String {
    let mut line = Vec::new();
    value
        .serialize(&mut Serializer::with_formatter(&mut line, QemuStyle))
        .expect("a JSON value serializes into memory");
    String::from_utf8(line).expect("QEMU-style JSON is ASCII")
}

struct QemuStyle;

impl QemuStyle {
    fn write_utf16_escapes<W: ?Sized + io::Write>(writer: &mut W, c: char) -> io::Result<()> {
        let mut units = [0; 2];
        for unit in c.encode_utf16(&mut units) {
            write!(writer, "\\u{unit:04X}")?;
        }
        Ok(())
    }
}

/// QEMU separates members and elements with `", "`.
fn separator<W: ?Sized + io::Write>(writer: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl Formatter for QemuStyle {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while let Some(escape) = rest.find(|c| !matches!(c, ' '..='~')) {
            writer.write_all(&rest.as_bytes()[..escape])?;
            let mut chars = rest[escape..].chars();
            if let Some(c) = chars.next() {
                QemuStyle::write_utf16_escapes(writer, c)?;
            }
            rest = chars.as_str();
        }
        writer.write_all(rest.as_bytes())
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        let escaped: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => {
                return QemuStyle::write_utf16_escapes(writer, char::from(byte));
            }
        };
        writer.write_all(escaped)
    }
}
