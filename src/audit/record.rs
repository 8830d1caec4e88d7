//! The canonical audit record (`proto/aegis/audit/v1/record.proto`) and its MAC.
//!
//! The prost message is written by hand to mirror the .proto file (no protoc at build time);
//! a test parses the .proto and checks every field name, number and type against this struct.

use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

/// Domain separation tag for the chain MAC.
pub const DOMAIN_TAG: &[u8] = b"aegis.audit.v1\x00";
pub const RECORD_VERSION: u32 = 1;
pub const GENESIS_MAC: [u8; 32] = [0u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Decision {
    Unspecified = 0,
    Allow = 1,
    Deny = 2,
    Admin = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub chain_id: String,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(int64, tag = "4")]
    pub ts_unix_micros: i64,
    #[prost(string, tag = "5")]
    pub trace_id: String,
    #[prost(string, tag = "6")]
    pub request_id: String,
    #[prost(enumeration = "Decision", tag = "7")]
    pub decision: i32,
    #[prost(string, tag = "8")]
    pub reason: String,
    #[prost(string, tag = "9")]
    pub issuer: String,
    #[prost(string, tag = "10")]
    pub subject: String,
    #[prost(string, tag = "11")]
    pub user_name: String,
    #[prost(string, tag = "12")]
    pub agent: String,
    #[prost(string, tag = "13")]
    pub workspace: String,
    #[prost(string, tag = "14")]
    pub method: String,
    #[prost(string, tag = "15")]
    pub path: String,
    #[prost(string, tag = "16")]
    pub token_source: String,
    #[prost(bytes = "vec", tag = "17")]
    pub token_fingerprint: Vec<u8>,
    #[prost(string, tag = "18")]
    pub key_id: String,
    #[prost(bytes = "vec", tag = "19")]
    pub prev_mac: Vec<u8>,
    #[prost(string, tag = "20")]
    pub instance_id: String,
    #[prost(string, tag = "21")]
    pub actor_chain: String,
    #[prost(string, tag = "22")]
    pub statement_kind: String,
    #[prost(bytes = "vec", tag = "23")]
    pub statement_fingerprint: Vec<u8>,
    #[prost(string, tag = "24")]
    pub mcp_tool: String,
    #[prost(string, tag = "25")]
    pub statement_text: String,
}

impl AuditRecord {
    /// `HMAC-SHA256(key, DOMAIN_TAG || encode(self) || prev_mac)`.
    pub fn mac(&self, key: &[u8; 32]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(DOMAIN_TAG);
        m.update(&self.encode_to_vec());
        m.update(&self.prev_mac);
        m.finalize().into_bytes().into()
    }

    /// The MAC and the transparency-log leaf hash (`SHA-256(0x00 || encode(self))`, see
    /// [`super::tlog`]), from one encoding of the record.
    pub fn mac_and_leaf(&self, key: &[u8; 32], buf: &mut Vec<u8>) -> ([u8; 32], [u8; 32]) {
        buf.clear();
        self.encode(buf)
            .unwrap_or_else(|_| unreachable!("a Vec grows as needed"));
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(DOMAIN_TAG);
        m.update(buf);
        m.update(&self.prev_mac);
        (
            m.finalize().into_bytes().into(),
            super::tlog::leaf_hash(buf),
        )
    }

    /// This record's transparency-log leaf hash.
    pub fn leaf_hash(&self) -> [u8; 32] {
        super::tlog::leaf_hash(&self.encode_to_vec())
    }

    /// Constant-time comparison of a stored MAC against the recomputed one.
    pub fn verify_mac(&self, key: &[u8; 32], mac: &[u8]) -> bool {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(DOMAIN_TAG);
        m.update(&self.encode_to_vec());
        m.update(&self.prev_mac);
        m.verify_slice(mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of the .proto, as (name, number, type), must match the prost struct.
    #[test]
    fn rust_struct_matches_the_proto_file() {
        let proto = include_str!("../../proto/aegis/audit/v1/record.proto");
        let body = proto
            .split("message AuditRecord {")
            .nth(1)
            .and_then(|s| s.split('}').next())
            .expect("message block");
        let mut fields = Vec::new();
        for line in body.lines() {
            let line = line.split("//").next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            let (decl, num) = line.trim_end_matches(';').split_once('=').unwrap();
            let mut it = decl.split_whitespace();
            let ty = it.next().unwrap().to_string();
            let name = it.next().unwrap().to_string();
            fields.push((name, num.trim().parse::<u32>().unwrap(), ty));
        }
        let expected: Vec<(&str, u32, &str)> = vec![
            ("version", 1, "uint32"),
            ("chain_id", 2, "string"),
            ("seq", 3, "uint64"),
            ("ts_unix_micros", 4, "int64"),
            ("trace_id", 5, "string"),
            ("request_id", 6, "string"),
            ("decision", 7, "Decision"),
            ("reason", 8, "string"),
            ("issuer", 9, "string"),
            ("subject", 10, "string"),
            ("user_name", 11, "string"),
            ("agent", 12, "string"),
            ("workspace", 13, "string"),
            ("method", 14, "string"),
            ("path", 15, "string"),
            ("token_source", 16, "string"),
            ("token_fingerprint", 17, "bytes"),
            ("key_id", 18, "string"),
            ("prev_mac", 19, "bytes"),
            ("instance_id", 20, "string"),
            ("actor_chain", 21, "string"),
            ("statement_kind", 22, "string"),
            ("statement_fingerprint", 23, "bytes"),
            ("mcp_tool", 24, "string"),
            ("statement_text", 25, "string"),
        ];
        let got: Vec<(&str, u32, &str)> = fields
            .iter()
            .map(|(n, k, t)| (n.as_str(), *k, t.as_str()))
            .collect();
        assert_eq!(got, expected);

        // And the struct encodes exactly those tags: set every field, decode the wire tags.
        let rec = AuditRecord {
            version: 1,
            chain_id: "c".into(),
            seq: 1,
            ts_unix_micros: 1,
            trace_id: "t".into(),
            request_id: "r".into(),
            decision: Decision::Allow as i32,
            reason: "x".into(),
            issuer: "i".into(),
            subject: "s".into(),
            user_name: "u".into(),
            agent: "a".into(),
            workspace: "w".into(),
            method: "m".into(),
            path: "p".into(),
            token_source: "f".into(),
            token_fingerprint: vec![1],
            key_id: "k".into(),
            prev_mac: vec![2],
            instance_id: "n".into(),
            actor_chain: "x".into(),
            statement_kind: "dcl".into(),
            statement_fingerprint: vec![3],
            mcp_tool: "t".into(),
            statement_text: "GRANT".into(),
        };
        let buf = rec.encode_to_vec();
        let mut tags = Vec::new();
        let mut b = &buf[..];
        while !b.is_empty() {
            let key = prost::encoding::decode_varint(&mut b).unwrap();
            let (tag, wire) = ((key >> 3) as u32, key & 7);
            tags.push(tag);
            match wire {
                0 => {
                    prost::encoding::decode_varint(&mut b).unwrap();
                }
                2 => {
                    let len = prost::encoding::decode_varint(&mut b).unwrap() as usize;
                    b = &b[len..];
                }
                _ => panic!("unexpected wire type"),
            }
        }
        assert_eq!(tags, (1..=25).collect::<Vec<u32>>());
    }

    #[test]
    fn mac_covers_every_field_and_the_link() {
        let key = [9u8; 32];
        let base = AuditRecord {
            version: 1,
            chain_id: "main".into(),
            seq: 7,
            user_name: "alice@example.com".into(),
            prev_mac: GENESIS_MAC.to_vec(),
            ..Default::default()
        };
        let mac = base.mac(&key);
        assert!(base.verify_mac(&key, &mac));
        let mut changed = base.clone();
        changed.user_name = "bob@example.com".into();
        assert!(!changed.verify_mac(&key, &mac));
        let mut relinked = base.clone();
        relinked.prev_mac = vec![1u8; 32];
        assert!(!relinked.verify_mac(&key, &mac));
        assert!(!base.verify_mac(&[8u8; 32], &mac));
    }
}
