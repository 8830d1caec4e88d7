//! Apache Thrift's binary protocol, as much of it as the SQL warehouse endpoint needs: one
//! message per HTTP body (`THttpClient`), decoded whole into a small value tree, and replies
//! built from the same tree.
//!
//! Generated code for all of TCLIService would be thousands of lines the sandbox never uses; a
//! value tree with field ids keeps the handlers close to the IDL (`TCLIService.thrift`, whose
//! field ids the handlers name) and skips every field they do not read, as a Thrift server does.
//! Decoding is bounded: nesting depth, and every length checked against the bytes left.

use std::fmt;

/// Message types (`TMessageType`).
pub const CALL: u8 = 1;
pub const REPLY: u8 = 2;
pub const EXCEPTION: u8 = 3;

/// The strict binary protocol's version word (`VERSION_1`).
const VERSION_1: u32 = 0x8001_0000;
const VERSION_MASK: u32 = 0xffff_0000;
/// Deepest nesting of structs, lists and maps accepted (TCLIService needs about 8).
const MAX_DEPTH: usize = 32;

// Wire types (`TType`).
const T_STOP: u8 = 0;
const T_BOOL: u8 = 2;
const T_BYTE: u8 = 3;
const T_DOUBLE: u8 = 4;
const T_I16: u8 = 6;
const T_I32: u8 = 8;
const T_I64: u8 = 10;
const T_STRING: u8 = 11;
const T_STRUCT: u8 = 12;
const T_MAP: u8 = 13;
const T_SET: u8 = 14;
const T_LIST: u8 = 15;

/// A decoded Thrift value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Byte(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    Double(f64),
    /// `string` and `binary` share one wire type.
    Bin(Vec<u8>),
    Struct(Struct),
    /// A list or a set: the element type and the elements.
    List(u8, Vec<Value>),
    /// Key type, value type and the entries.
    Map(u8, u8, Vec<(Value, Value)>),
}

/// A struct: its fields in wire order (a repeated id: the last one wins, as in Thrift).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Struct(pub Vec<(i16, Value)>);

/// One message: the method name, the message type, the sequence id and the arguments (or the
/// result) struct.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub name: String,
    pub kind: u8,
    pub seqid: i32,
    pub body: Struct,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for DecodeError {}

// === impl Value ===

impl Value {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Bool(_) => T_BOOL,
            Value::Byte(_) => T_BYTE,
            Value::I16(_) => T_I16,
            Value::I32(_) => T_I32,
            Value::I64(_) => T_I64,
            Value::Double(_) => T_DOUBLE,
            Value::Bin(_) => T_STRING,
            Value::Struct(_) => T_STRUCT,
            Value::List(..) => T_LIST,
            Value::Map(..) => T_MAP,
        }
    }

    pub fn str(s: impl Into<String>) -> Value {
        Value::Bin(s.into().into_bytes())
    }

    pub fn strings(list: impl IntoIterator<Item = String>) -> Value {
        Value::List(T_STRING, list.into_iter().map(Value::str).collect())
    }

    pub fn structs(list: impl IntoIterator<Item = Struct>) -> Value {
        Value::List(T_STRUCT, list.into_iter().map(Value::Struct).collect())
    }

    pub fn i32s(list: impl IntoIterator<Item = i32>) -> Value {
        Value::List(T_I32, list.into_iter().map(Value::I32).collect())
    }

    pub fn i64s(list: impl IntoIterator<Item = i64>) -> Value {
        Value::List(T_I64, list.into_iter().map(Value::I64).collect())
    }

    pub fn doubles(list: impl IntoIterator<Item = f64>) -> Value {
        Value::List(T_DOUBLE, list.into_iter().map(Value::Double).collect())
    }

    pub fn bools(list: impl IntoIterator<Item = bool>) -> Value {
        Value::List(T_BOOL, list.into_iter().map(Value::Bool).collect())
    }

    pub fn string_map(entries: impl IntoIterator<Item = (String, String)>) -> Value {
        Value::Map(
            T_STRING,
            T_STRING,
            entries
                .into_iter()
                .map(|(k, v)| (Value::str(k), Value::str(v)))
                .collect(),
        )
    }
}

// === impl Struct ===

impl Struct {
    pub fn new() -> Struct {
        Struct(Vec::new())
    }

    /// Adds field `id`.
    pub fn with(mut self, id: i16, value: Value) -> Struct {
        self.0.push((id, value));
        self
    }

    /// Adds field `id` when there is a value (an optional field left unset otherwise).
    pub fn with_opt(self, id: i16, value: Option<Value>) -> Struct {
        match value {
            Some(v) => self.with(id, v),
            None => self,
        }
    }

    pub fn get(&self, id: i16) -> Option<&Value> {
        self.0.iter().rev().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    pub fn get_struct(&self, id: i16) -> Option<&Struct> {
        match self.get(id) {
            Some(Value::Struct(s)) => Some(s),
            _ => None,
        }
    }

    pub fn get_bytes(&self, id: i16) -> Option<&[u8]> {
        match self.get(id) {
            Some(Value::Bin(b)) => Some(b),
            _ => None,
        }
    }

    /// A `string` field that holds UTF-8.
    pub fn get_str(&self, id: i16) -> Option<&str> {
        self.get_bytes(id).and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn get_i32(&self, id: i16) -> Option<i32> {
        match self.get(id) {
            Some(Value::I32(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn get_i64(&self, id: i16) -> Option<i64> {
        match self.get(id) {
            Some(Value::I64(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn get_bool(&self, id: i16) -> Option<bool> {
        match self.get(id) {
            Some(Value::Bool(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn get_list(&self, id: i16) -> Option<&[Value]> {
        match self.get(id) {
            Some(Value::List(_, items)) => Some(items),
            _ => None,
        }
    }
}

// === Decoding ===

/// Decodes one strict binary-protocol message that fills `buf` exactly.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let word = r.u32()?;
    if word & VERSION_MASK != VERSION_1 {
        return Err(DecodeError("not a strict binary-protocol message"));
    }
    let kind = (word & 0xff) as u8;
    let name = String::from_utf8(r.bytes()?.to_vec())
        .map_err(|_| DecodeError("the method name is not UTF-8"))?;
    let seqid = r.i32()?;
    let body = r.structure(0)?;
    if r.pos != buf.len() {
        return Err(DecodeError("trailing bytes after the message"));
    }
    Ok(Message {
        name,
        kind,
        seqid,
        body,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(DecodeError("the message ends early"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    /// A length that must fit in what is left, `unit` bytes per item at least.
    fn len(&mut self, unit: usize) -> Result<usize, DecodeError> {
        let n = self.i32()?;
        let n = usize::try_from(n).map_err(|_| DecodeError("a negative length"))?;
        if n.saturating_mul(unit.max(1)) > self.buf.len() - self.pos {
            return Err(DecodeError("a length past the end of the message"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len(1)?;
        self.take(n)
    }

    fn structure(&mut self, depth: usize) -> Result<Struct, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError("nested too deeply"));
        }
        let mut fields = Vec::new();
        loop {
            let ty = self.u8()?;
            if ty == T_STOP {
                return Ok(Struct(fields));
            }
            let id = self.i16()?;
            fields.push((id, self.value(ty, depth + 1)?));
        }
    }

    fn value(&mut self, ty: u8, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError("nested too deeply"));
        }
        Ok(match ty {
            T_BOOL => Value::Bool(self.u8()? != 0),
            T_BYTE => Value::Byte(self.u8()? as i8),
            T_I16 => Value::I16(self.i16()?),
            T_I32 => Value::I32(self.i32()?),
            T_I64 => Value::I64(self.i64()?),
            T_DOUBLE => Value::Double(f64::from_bits(self.i64()? as u64)),
            T_STRING => Value::Bin(self.bytes()?.to_vec()),
            T_STRUCT => Value::Struct(self.structure(depth)?),
            T_LIST | T_SET => {
                let elem = self.u8()?;
                let n = self.len(1)?;
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::List(elem, items)
            }
            T_MAP => {
                let (k, v) = (self.u8()?, self.u8()?);
                let n = self.len(2)?;
                let mut entries = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let key = self.value(k, depth + 1)?;
                    entries.push((key, self.value(v, depth + 1)?));
                }
                Value::Map(k, v, entries)
            }
            _ => return Err(DecodeError("an unknown field type")),
        })
    }
}

// === Encoding ===

/// Encodes a message (a reply or an exception).
pub fn encode(name: &str, kind: u8, seqid: i32, body: &Struct) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&(VERSION_1 | u32::from(kind)).to_be_bytes());
    put_bytes(&mut out, name.as_bytes());
    out.extend_from_slice(&seqid.to_be_bytes());
    put_struct(&mut out, body);
    out
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&i32::try_from(n).unwrap_or(i32::MAX).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn put_struct(out: &mut Vec<u8>, s: &Struct) {
    for (id, v) in &s.0 {
        out.push(v.wire_type());
        out.extend_from_slice(&id.to_be_bytes());
        put_value(out, v);
    }
    out.push(T_STOP);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Byte(b) => out.push(*b as u8),
        Value::I16(n) => out.extend_from_slice(&n.to_be_bytes()),
        Value::I32(n) => out.extend_from_slice(&n.to_be_bytes()),
        Value::I64(n) => out.extend_from_slice(&n.to_be_bytes()),
        Value::Double(d) => out.extend_from_slice(&d.to_bits().to_be_bytes()),
        Value::Bin(b) => put_bytes(out, b),
        Value::Struct(s) => put_struct(out, s),
        Value::List(elem, items) => {
            out.push(*elem);
            put_len(out, items.len());
            for i in items {
                put_value(out, i);
            }
        }
        Value::Map(k, v, entries) => {
            out.push(*k);
            out.push(*v);
            put_len(out, entries.len());
            for (key, value) in entries {
                put_value(out, key);
                put_value(out, value);
            }
        }
    }
}

/// A `TApplicationException` reply (unknown method, a request that does not decode).
pub fn application_exception(name: &str, seqid: i32, kind: i32, message: &str) -> Vec<u8> {
    let body = Struct::new()
        .with(1, Value::str(message))
        .with(2, Value::I32(kind));
    encode(name, EXCEPTION, seqid, &body)
}

/// `TApplicationExceptionType` values used here.
pub const UNKNOWN_METHOD: i32 = 1;
pub const PROTOCOL_ERROR: i32 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_what_is_not_one_whole_message() {
        let body = Struct::new()
            .with(1, Value::str("SELECT 1"))
            .with(
                2,
                Value::Struct(
                    Struct::new()
                        .with(1, Value::I64(-7))
                        .with(2, Value::Bool(true)),
                ),
            )
            .with(3, Value::strings(["a".to_string(), "b".to_string()]))
            .with(4, Value::string_map([("k".to_string(), "v".to_string())]))
            .with(5, Value::doubles([1.5]))
            .with(1281, Value::I32(42));
        let bytes = encode("ExecuteStatement", CALL, 9, &body);
        let m = decode(&bytes).expect("decodes");
        assert_eq!(m.name, "ExecuteStatement");
        assert_eq!((m.kind, m.seqid), (CALL, 9));
        assert_eq!(m.body, body);
        assert_eq!(m.body.get_str(1), Some("SELECT 1"));
        assert_eq!(m.body.get_i32(1281), Some(42));

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A list claiming more elements than bytes left is refused before allocating.
        let mut huge = encode("X", CALL, 1, &Struct::new());
        huge.truncate(huge.len() - 1);
        huge.extend_from_slice(&[T_LIST, 0, 1, T_I64, 0x7f, 0xff, 0xff, 0xff, 0]);
        assert!(decode(&huge).is_err());
        // Deep nesting is refused.
        let mut deep = encode("X", CALL, 1, &Struct::new());
        deep.truncate(deep.len() - 1);
        for _ in 0..100 {
            deep.extend_from_slice(&[T_STRUCT, 0, 1]);
        }
        deep.extend(std::iter::repeat_n(T_STOP, 101));
        assert_eq!(decode(&deep), Err(DecodeError("nested too deeply")));
    }
}
