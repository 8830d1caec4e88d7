//! Where one principal's cached state lives, and how a revocation reaches it.
//!
//! A principal is (issuer, subject) as verified from the IdP token. Everything cached or
//! stored for a user is keyed by (workspace, principal) — never by the user name alone, since
//! two issuers (or one careless one) may assert the same user name for different people. The
//! user name is still part of the key: a principal whose user name changes starts afresh.
//!
//! Redis keys share a hash tag per (workspace, user name), `aegis:v2:{tag}:...`, so every
//! principal that maps to one user name sits in one hash slot and `aegis token revoke --user`
//! is one atomic script, also on Redis Cluster:
//!
//! - `tok:<pid>`   the sealed token (L2);
//! - `lock:<pid>`  the cross-replica mint lock;
//! - `gen:<pid>`   the revocation generation: a random value a revocation replaces. A lookup
//!   reads it before minting and stores its token only if it is unchanged, so a mint that was
//!   in flight during a revocation is discarded, never cached;
//! - `principals`  the principals that looked this user name up (for revocation by name).

use sha2::{Digest, Sha256};

/// How long a user name's principal index and revocation generations outlive their last
/// use: far longer than any token or lookup, so a revocation is never forgotten mid-flight.
pub const INDEX_TTL_MS: u64 = 24 * 3600 * 1000;

/// Prefix of a revocation event: `revoke:<hex of the L1 key>`.
pub const REVOKE_PREFIX: &str = "revoke:";

/// SHA-256 over length-prefixed parts, so no two part lists hash alike.
fn digest(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The principal id: 128 bits of SHA-256 over (issuer, subject), as 32 hex digits, on the
/// stack (the Check path computes it for every request).
pub fn principal_hex(issuer: &str, subject: &str) -> [u8; 32] {
    let d = digest(
        b"aegis.principal.v1",
        &[issuer.as_bytes(), subject.as_bytes()],
    );
    let mut out = [0u8; 32];
    // Cannot fail: 16 bytes are exactly 32 hex digits.
    let _ = hex::encode_to_slice(&d[..16], &mut out);
    out
}

/// [`principal_hex`] as a string (Redis key names, the revocation script's arguments).
pub fn principal_id(issuer: &str, subject: &str) -> String {
    String::from_utf8_lossy(&principal_hex(issuer, subject)).into_owned()
}

/// The id of a rate-limit subject (a user name, an agent, or both), as hex.
pub fn limit_id(parts: &[&str]) -> String {
    let bytes: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    hex::encode(&digest(b"aegis.limit.v1", &bytes)[..16])
}

/// The in-process (L1) key of a principal's token in a workspace; `pid` is its hex id.
pub fn l1_key(workspace: &str, user_name: &str, pid: &[u8]) -> [u8; 32] {
    digest(
        b"aegis.l1.v2",
        &[workspace.as_bytes(), user_name.as_bytes(), pid],
    )
}

/// The Redis key prefix, hash tag included, of every principal of one user name.
pub fn name_prefix(workspace: &str, user_name: &str) -> String {
    let d = digest(
        b"aegis.tag.v2",
        &[workspace.as_bytes(), user_name.as_bytes()],
    );
    format!("aegis:v2:{{{}}}:", hex::encode(&d[..16]))
}

/// The Redis keys of one principal.
pub struct Keys {
    pub prefix: String,
    pub pid: String,
}

impl Keys {
    pub fn new(workspace: &str, user_name: &str, issuer: &str, subject: &str) -> Keys {
        Keys {
            prefix: name_prefix(workspace, user_name),
            pid: principal_id(issuer, subject),
        }
    }

    pub fn tok(&self) -> String {
        format!("{}tok:{}", self.prefix, self.pid)
    }

    pub fn lock(&self) -> String {
        format!("{}lock:{}", self.prefix, self.pid)
    }

    pub fn gen(&self) -> String {
        format!("{}gen:{}", self.prefix, self.pid)
    }

    pub fn index(&self) -> String {
        index_key(&self.prefix)
    }
}

pub fn index_key(prefix: &str) -> String {
    format!("{prefix}principals")
}

/// Registers the principal under its user name and reads its token and generation, in one
/// atomic step. KEYS: tok, gen, index. ARGV: pid, index ttl (ms). Returns [token, generation].
pub const LOOKUP_SCRIPT: &str = r"
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
";

/// Stores a token only if the generation is still the one read before minting.
/// KEYS: tok, gen. ARGV: expected generation ('' for none), sealed token, ttl (ms).
/// Returns 1 when stored, 0 when a revocation came in between.
pub const STORE_SCRIPT: &str = r"
local g = redis.call('GET', KEYS[2]) or ''
if g ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Revokes principals of one user name: a fresh generation and no L2 token for each.
/// KEYS: index. ARGV: key prefix, ttl (ms), new generation, then the pids to revoke (none:
/// every principal in the index). Every key lies in the index's hash slot. Returns the pids.
pub const REVOKE_SCRIPT: &str = r"
local pids = {}
if #ARGV > 3 then
  for i = 4, #ARGV do pids[#pids + 1] = ARGV[i] end
else
  pids = redis.call('SMEMBERS', KEYS[1])
end
for _, p in ipairs(pids) do
  redis.call('SET', ARGV[1] .. 'gen:' .. p, ARGV[3], 'PX', ARGV[2])
  redis.call('DEL', ARGV[1] .. 'tok:' .. p)
end
return pids
";

/// GCRA request limits, all keys of one workspace in one hash slot. KEYS: one per limit.
/// ARGV: for each key, its emission interval and burst tolerance (microseconds). Time is
/// Redis' own (`TIME`), so replicas with skewed clocks share one limit. Returns 0 when the
/// request conforms to every limit (and counts it against all of them), else how many
/// microseconds until it would (and counts nothing).
pub const LIMIT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local earliest = tat - tolerance
  if now < earliest and earliest - now > wait then wait = earliest - now end
  tats[i] = tat
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tat = tats[i] + interval
  redis.call('SET', key, tat, 'PX', math.floor((tat - now) / 1000) + 1000)
end
return 0
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_that_share_a_user_name_get_different_keys_in_one_slot() {
        let a = Keys::new("prod", "alice@example.com", "https://idp-a", "u-alice");
        let m = Keys::new("prod", "alice@example.com", "https://idp-b", "mallory");
        assert_ne!(a.tok(), m.tok());
        assert_ne!(a.lock(), m.lock());
        assert_ne!(a.gen(), m.gen());
        assert_eq!(a.index(), m.index());
        // One hash tag for both, so a revocation by user name is one script.
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_string();
        assert_eq!(tag(&a.tok()), tag(&m.gen()));
        assert_ne!(
            l1_key("prod", "alice@example.com", a.pid.as_bytes()),
            l1_key("prod", "alice@example.com", m.pid.as_bytes())
        );
        // Length prefixes: moving a byte between issuer and subject changes the id.
        assert_ne!(principal_id("ab", "c"), principal_id("a", "bc"));
        // The user name never appears in a key.
        assert!(!a.tok().contains("alice"));
    }
}
