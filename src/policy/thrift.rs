//! Just enough of a TCLIService call (Thrift's strict binary protocol, one message per HTTP body,
//! as `databricks-sql-connector` and the JDBC/ODBC drivers send it to the SQL warehouse endpoint)
//! for the statement guardrail: the method name and, for `ExecuteStatement`, the SQL text.
//!
//! The whole message is walked, every field it does not need skipped, so a body that is not
//! exactly one well-formed call is refused rather than judged by a prefix. Nothing is
//! allocated: the name and the statement are borrowed from the body. Nesting is bounded and
//! every length is checked against the bytes left before it is used.

/// Why a body is not a call aegis can read (fixed text, for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThriftError(pub &'static str);

/// A TCLIService call, as far as the guardrail reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    pub method: &'a str,
    /// `TExecuteStatementReq.statement` of an `ExecuteStatement` call; None for other calls.
    pub statement: Option<&'a str>,
}

const VERSION_1: u32 = 0x8001_0000;
const VERSION_MASK: u32 = 0xffff_0000;
const CALL: u32 = 1;
const ONEWAY: u32 = 4;
/// TCLIService's deepest value is about 8 levels down; anything far deeper is not a real call.
const MAX_DEPTH: u32 = 24;

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

/// Field ids in `TCLIService.thrift`: `ExecuteStatement_args.req` and
/// `TExecuteStatementReq.statement`.
const ARGS_REQ: i16 = 1;
const REQ_STATEMENT: i16 = 2;

/// Reads one call. `ExecuteStatement` (compared ignoring ASCII case, so no spelling a lenient
/// server might accept slips by) must carry exactly one UTF-8 statement.
pub fn read_call(body: &[u8]) -> Result<Call<'_>, ThriftError> {
    let mut r = Reader { buf: body, pos: 0 };
    let word = r.u32()?;
    if word & VERSION_MASK != VERSION_1 {
        return Err(ThriftError("not a strict binary-protocol message"));
    }
    if !matches!(word & 0xff, CALL | ONEWAY) || word & 0xff00 != 0 {
        return Err(ThriftError("not a call"));
    }
    let method =
        std::str::from_utf8(r.bytes()?).map_err(|_| ThriftError("the method name is not UTF-8"))?;
    r.take(4)?; // seqid
    let execute = method.eq_ignore_ascii_case("ExecuteStatement");
    let mut statement = None;
    // The arguments struct.
    loop {
        let ty = r.u8()?;
        if ty == T_STOP {
            break;
        }
        let id = r.i16()?;
        if execute && id == ARGS_REQ && ty == T_STRUCT {
            // TExecuteStatementReq.
            loop {
                let ty = r.u8()?;
                if ty == T_STOP {
                    break;
                }
                let id = r.i16()?;
                if id == REQ_STATEMENT && ty == T_STRING {
                    let text = std::str::from_utf8(r.bytes()?)
                        .map_err(|_| ThriftError("the statement is not UTF-8"))?;
                    if statement.replace(text).is_some() {
                        return Err(ThriftError("more than one statement"));
                    }
                } else {
                    r.skip(ty, 2)?;
                }
            }
        } else {
            r.skip(ty, 1)?;
        }
    }
    if r.pos != body.len() {
        return Err(ThriftError("bytes after the call"));
    }
    if execute && statement.is_none() {
        return Err(ThriftError("ExecuteStatement without a statement"));
    }
    Ok(Call { method, statement })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ThriftError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(ThriftError("the body ends early"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ThriftError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, ThriftError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ThriftError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count or a length: not negative, and `n * min_size` bytes must be left.
    fn count(&mut self, min_size: usize) -> Result<usize, ThriftError> {
        let n = usize::try_from(self.u32()? as i32).map_err(|_| ThriftError("a negative size"))?;
        if n.saturating_mul(min_size) > self.buf.len() - self.pos {
            return Err(ThriftError("a size past the end of the body"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], ThriftError> {
        let n = self.count(1)?;
        self.take(n)
    }

    /// Skips one value of type `ty`.
    fn skip(&mut self, ty: u8, depth: u32) -> Result<(), ThriftError> {
        if depth > MAX_DEPTH {
            return Err(ThriftError("nested too deeply"));
        }
        match ty {
            T_BOOL | T_BYTE => self.take(1).map(drop),
            T_I16 => self.take(2).map(drop),
            T_I32 => self.take(4).map(drop),
            T_DOUBLE | T_I64 => self.take(8).map(drop),
            T_STRING => self.bytes().map(drop),
            T_STRUCT => loop {
                let ty = self.u8()?;
                if ty == T_STOP {
                    return Ok(());
                }
                self.i16()?;
                self.skip(ty, depth + 1)?;
            },
            T_LIST | T_SET => {
                let elem = self.u8()?;
                for _ in 0..self.count(min_size(elem)?)? {
                    self.skip(elem, depth + 1)?;
                }
                Ok(())
            }
            T_MAP => {
                let (k, v) = (self.u8()?, self.u8()?);
                let n = self.count(min_size(k)? + min_size(v)?)?;
                for _ in 0..n {
                    self.skip(k, depth + 1)?;
                    self.skip(v, depth + 1)?;
                }
                Ok(())
            }
            _ => Err(ThriftError("an unknown field type")),
        }
    }
}

/// The fewest bytes a value of type `ty` takes, so a count can be checked before it is used.
fn min_size(ty: u8) -> Result<usize, ThriftError> {
    Ok(match ty {
        T_BOOL | T_BYTE | T_STRUCT => 1,
        T_I16 => 2,
        T_I32 | T_STRING => 4,
        T_DOUBLE | T_I64 => 8,
        T_LIST | T_SET => 5,
        T_MAP => 6,
        _ => return Err(ThriftError("an unknown element type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // Golden bytes written by the Python `thrift` library (0.25.0) with the TCLIService client
    // that databricks-sql-connector 4.9.0 ships, exactly as the connector fills the requests
    // (TBinaryProtocol over TMemoryBuffer, `client.send_ExecuteStatement(req)` and so on):
    //
    //   req = ttypes.TExecuteStatementReq(
    //       sessionHandle=ttypes.TSessionHandle(sessionId=ttypes.THandleIdentifier(
    //           guid=bytes(range(16)), secret=bytes(range(16, 32)))),
    //       statement="GRANT SELECT ON TABLE main.sales.orders TO `bob@example.com`",
    //       runAsync=True,
    //       getDirectResults=ttypes.TSparkGetDirectResults(maxRows=10000, maxBytes=10485760),
    //       canReadArrowResult=True, canDecompressLZ4Result=True, canDownloadResult=True,
    //       confOverlay={"spark.thriftserver.arrowBasedRowSet.timestampAsString": "false"},
    //       useArrowNativeTypes=ttypes.TSparkArrowTypes(timestampAsArrow=True,
    //           decimalAsArrow=True, complexTypesAsArrow=True, intervalTypesAsArrow=False),
    //       parameters=[ttypes.TSparkParameter(name="r", type="STRING",
    //           value=ttypes.TSparkParameterValue(stringValue="EMEA"))],
    //       enforceEmbeddedSchemaCorrectness=False)
    //   seqid 3
    const EXECUTE_GRANT: &str = include_str!("thrift_golden/execute_grant.hex");
    //   TGetTablesReq(sessionHandle=<as above>, getDirectResults=<as above>,
    //       catalogName="main", tableTypes=["TABLE", "VIEW"]), seqid 7
    const GET_TABLES: &str = include_str!("thrift_golden/get_tables.hex");
    //   TOpenSessionReq(client_protocol_i64=SPARK_CLI_SERVICE_PROTOCOL_V7,
    //       canUseMultipleCatalogs=True,
    //       configuration={"spark.thriftserver.arrowBasedRowSet.timestampAsString": "false"}),
    //   seqid 1
    const OPEN_SESSION: &str = include_str!("thrift_golden/open_session.hex");

    #[test]
    fn reads_the_statement_of_a_call_the_python_library_wrote() {
        let body = hex(EXECUTE_GRANT);
        assert_eq!(
            read_call(&body),
            Ok(Call {
                method: "ExecuteStatement",
                statement: Some("GRANT SELECT ON TABLE main.sales.orders TO `bob@example.com`"),
            })
        );
        let tables = hex(GET_TABLES);
        assert_eq!(
            read_call(&tables),
            Ok(Call {
                method: "GetTables",
                statement: None
            })
        );
        let open = hex(OPEN_SESSION);
        assert_eq!(read_call(&open).map(|c| c.method), Ok("OpenSession"));
    }

    #[test]
    fn refuses_what_is_not_exactly_one_well_formed_call() {
        let body = hex(EXECUTE_GRANT);
        // Every prefix is refused, and so is anything after the call.
        for cut in 0..body.len() {
            assert!(read_call(&body[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut trailing = body.clone();
        trailing.extend_from_slice(&body);
        assert_eq!(
            read_call(&trailing),
            Err(ThriftError("bytes after the call"))
        );
        // A reply, the old unversioned framing, and JSON are not calls.
        let mut reply = body.clone();
        reply[3] = 2;
        assert!(read_call(&reply).is_err());
        assert!(read_call(&body[4..]).is_err());
        assert!(read_call(br#"{"statement": "GRANT"}"#).is_err());
        assert!(read_call(b"").is_err());

        // The method name in another case is still judged as ExecuteStatement.
        let name_at = 8;
        let mut lower = body.clone();
        lower[name_at] = b'e';
        assert_eq!(read_call(&lower).map(|c| c.statement.is_some()), Ok(true));
    }

    /// A call built by hand: `ExecuteStatement` whose request struct holds `fields`.
    fn execute_with(fields: &[u8]) -> Vec<u8> {
        let mut b = vec![0x80, 0x01, 0x00, 0x01];
        b.extend_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(b"ExecuteStatement");
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&[T_STRUCT, 0, 1]);
        b.extend_from_slice(fields);
        b.extend_from_slice(&[T_STOP, T_STOP]);
        b
    }

    fn string_field(id: u8, s: &[u8]) -> Vec<u8> {
        let mut f = vec![T_STRING, 0, id];
        f.extend_from_slice(&(s.len() as u32).to_be_bytes());
        f.extend_from_slice(s);
        f
    }

    #[test]
    fn a_missing_repeated_or_unreadable_statement_is_refused() {
        let one = string_field(2, b"SELECT 1");
        assert_eq!(
            read_call(&execute_with(&one)).map(|c| c.statement),
            Ok(Some("SELECT 1"))
        );
        let mut two = one.clone();
        two.extend_from_slice(&string_field(2, b"GRANT ALL ON CATALOG main TO x"));
        assert_eq!(
            read_call(&execute_with(&two)),
            Err(ThriftError("more than one statement"))
        );
        assert_eq!(
            read_call(&execute_with(&string_field(3, b"x"))),
            Err(ThriftError("ExecuteStatement without a statement"))
        );
        assert!(read_call(&execute_with(&string_field(2, &[0xff, 0xfe]))).is_err());
        // A list claiming more elements than there are bytes is refused before it is walked.
        let huge = [T_LIST, 0, 9, T_I64, 0x7f, 0xff, 0xff, 0xff];
        assert_eq!(
            read_call(&execute_with(&huge)),
            Err(ThriftError("a size past the end of the body"))
        );
        // Deep nesting is refused.
        let mut deep = Vec::new();
        for _ in 0..64 {
            deep.extend_from_slice(&[T_STRUCT, 0, 9]);
        }
        deep.extend(std::iter::repeat_n(T_STOP, 64));
        assert_eq!(
            read_call(&execute_with(&deep)),
            Err(ThriftError("nested too deeply"))
        );
    }
}
