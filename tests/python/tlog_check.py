"""An independent reader and witness of aegis' transparency log, written from the specs only
(RFC 6962 / RFC 9162 section 2.1, C2SP tlog-tiles, tlog-checkpoint, signed-note,
tlog-cosignature, tlog-witness), sharing no code with aegis.

    tlog_check.py check URL VKEY [--trusted SIZE ROOT_B64] [--witness VKEY ... --quorum N]
        Fetches URL/checkpoint, verifies it, fetches every entry bundle and tile the tree needs,
        recomputes the tree from the entries and compares it with the checkpoint and the tiles.
        With --trusted, also requires that the tree of the first SIZE entries has ROOT_B64 (a
        checkpoint the reader saw before). Prints one JSON object; exit 0 consistent, 1 not.
    tlog_check.py receipt FILE VKEY
        Checks an `aegis audit prove` receipt offline. Exit 0 valid, 1 not.
    tlog_check.py witness PORT LOG_VKEY
        Runs a witness (tlog-witness add-checkpoint) for the log on 127.0.0.1:PORT with a fresh
        Ed25519 cosignature key; prints its vkey on the first line of stdout, then serves until
        killed. Its state (the latest cosigned size and root per origin) is in memory.
"""

import base64
import hashlib
import http.server
import json
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# --- RFC 6962 hashing ---


def sha256(b):
    return hashlib.sha256(b).digest()


def leaf_hash(entry):
    return sha256(b"\x00" + entry)


def node_hash(left, right):
    return sha256(b"\x01" + left + right)


def mth(hashes):
    """MTH over a list of leaf hashes (RFC 6962 2.1), recursively as the RFC defines it."""
    n = len(hashes)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return hashes[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(mth(hashes[:k]), mth(hashes[k:]))


def largest_pow2_below(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def verify_inclusion(index, size, leaf, proof, root):
    """RFC 9162 2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_root, second_root, proof):
    """RFC 9162 2.1.4.2."""
    if first > second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof
    if not proof:
        return False
    if first & (first - 1) == 0:
        proof = [first_root] + list(proof)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


# --- signed notes ---


def key_id(name, kind, pub):
    return sha256(name.encode() + b"\n" + bytes([kind]) + pub)[:4]


def parse_vkey(text):
    name, kid, key = text.strip().split("+", 2)
    raw = base64.b64decode(key, validate=True)
    kind, pub = raw[0], raw[1:]
    assert len(pub) == 32, "not an Ed25519 key"
    assert key_id(name, kind, pub).hex() == kid, "key id does not match"
    return {"name": name, "id": bytes.fromhex(kid), "kind": kind, "pub": pub}


def split_note(note):
    at = note.rindex("\n\n")
    text, sigs = note[: at + 1], note[at + 2 :]
    assert sigs.endswith("\n"), "signature block does not end in a newline"
    lines = []
    for line in sigs[:-1].split("\n"):
        assert line.startswith("\u2014 "), "not a signature line: %r" % line
        name, sig = line[2:].split(" ", 1)
        raw = base64.b64decode(sig, validate=True)
        lines.append({"name": name, "id": raw[:4], "sig": raw[4:], "line": line + "\n"})
    return text, lines


def verify_sig(key, text, line):
    """None: another key; True/False: this key's signature verifies or not. Cosignatures
    (type 0x04) sign 'cosignature/v1\\ntime T\\n' + text and carry T first."""
    if line["name"] != key["name"] or line["id"] != key["id"]:
        return None
    pub = Ed25519PublicKey.from_public_bytes(key["pub"])
    try:
        if key["kind"] == 0x01:
            pub.verify(line["sig"], text.encode())
        elif key["kind"] == 0x04:
            if len(line["sig"]) != 72:
                return False
            (t,) = struct.unpack(">Q", line["sig"][:8])
            pub.verify(line["sig"][8:], b"cosignature/v1\ntime %d\n" % t + text.encode())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def open_checkpoint(note, log, witnesses=()):
    text, lines = split_note(note)
    signed, cosigned = False, set()
    for ln in lines:
        ok = verify_sig(log, text, ln)
        if ok is False:
            raise ValueError("the log signature does not verify")
        if ok:
            signed = True
            continue
        for w in witnesses:
            okw = verify_sig(w, text, ln)
            if okw is False:
                raise ValueError("a cosignature of %s does not verify" % w["name"])
            if okw:
                cosigned.add(w["name"])
    if not signed:
        raise ValueError("not signed by the log key")
    body = text.split("\n")
    origin, size, root = body[0], int(body[1]), base64.b64decode(body[2], validate=True)
    assert str(size) == body[1], "size has leading zeroes"
    assert len(root) == 32
    if origin != log["name"]:
        raise ValueError("origin is not the log key's name")
    return {"origin": origin, "size": size, "root": root, "text": text, "cosigned": cosigned}


# --- tiles ---


def index_path(n):
    parts = ["%03d" % (n % 1000)]
    n //= 1000
    while n > 0:
        parts.append("x%03d" % (n % 1000))
        n //= 1000
    return "/".join(reversed(parts))


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def tile_url(base, level, index, width):
    suffix = "" if width == 256 else ".p/%d" % width
    lvl = "entries" if level is None else str(level)
    return "%s/tile/%s/%s%s" % (base, lvl, index_path(index), suffix)


def check(base, vkey_text, trusted=None, witness_keys=(), quorum=0):
    log = parse_vkey(vkey_text)
    wkeys = [parse_vkey(w) for w in witness_keys]
    status, body = fetch(base + "/checkpoint")
    if status != 200:
        return {"ok": False, "problem": "no checkpoint (%d)" % status}
    try:
        cp = open_checkpoint(body.decode(), log, wkeys)
    except (ValueError, AssertionError) as e:
        return {"ok": False, "problem": "checkpoint: %s" % e}
    if len(cp["cosigned"]) < quorum:
        return {"ok": False, "problem": "only %d cosignatures" % len(cp["cosigned"])}
    size, root = cp["size"], cp["root"]
    result = {"size": size, "root": base64.b64encode(root).decode(), "cosigned": sorted(cp["cosigned"])}
    if trusted is not None and trusted[0] > size:
        return dict(result, ok=False, problem="rolled back: size %d after a trusted %d" % (size, trusted[0]))
    # Every entry, bundle by bundle.
    leaves, entries = [], []
    for i in range((size + 255) // 256):
        width = min(256, size - i * 256)
        status, data = fetch(tile_url(base, None, i, width))
        if status != 200:
            return dict(result, ok=False, problem="entry bundle %d: HTTP %d" % (i, status))
        at, got = 0, 0
        while at < len(data):
            (n,) = struct.unpack(">H", data[at : at + 2])
            entry = data[at + 2 : at + 2 + n]
            entries.append(entry)
            leaves.append(leaf_hash(entry))
            at += 2 + n
            got += 1
        if got != width:
            return dict(result, ok=False, problem="entry bundle %d holds %d entries, not %d" % (i, got, width))
    if mth(leaves) != root:
        return dict(result, ok=False, problem="the entries do not hash to the checkpoint's root")
    # Every tile the tree has, against the entries.
    level_hashes = leaves
    level = 0
    while len(level_hashes) > 0:
        for i in range((len(level_hashes) + 255) // 256):
            part = level_hashes[i * 256 : (i + 1) * 256]
            status, data = fetch(tile_url(base, level, i, len(part)))
            if status != 200 or data != b"".join(part):
                return dict(result, ok=False, problem="tile %d/%d is not the entries' tree" % (level, i))
        full = len(level_hashes) // 256
        level_hashes = [mth(level_hashes[i * 256 : (i + 1) * 256]) for i in range(full)]
        level += 1
    if trusted is not None:
        old_size, old_root = trusted
        if mth(leaves[:old_size]) != old_root:
            return dict(result, ok=False, problem="the log does not extend the trusted checkpoint of size %d" % old_size)
    return dict(result, ok=True, entries=len(entries))


def check_receipt(path, vkey_text):
    log = parse_vkey(vkey_text)
    with open(path) as f:
        r = json.load(f)
    cp = open_checkpoint(r["checkpoint"], log)
    for e in r["entries"]:
        entry = base64.b64decode(e["entry"], validate=True)
        proof = [base64.b64decode(h, validate=True) for h in e["inclusion_proof"]]
        if not verify_inclusion(e["leaf_index"], cp["size"], leaf_hash(entry), proof, cp["root"]):
            return {"ok": False, "problem": "inclusion proof of leaf %d fails" % e["leaf_index"]}
    return {"ok": True, "size": cp["size"], "entries": len(r["entries"])}


# --- a witness (tlog-witness) ---


def run_witness(port, log_vkey_text):
    log = parse_vkey(log_vkey_text)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    name = "witness.test/w1"
    kid = key_id(name, 0x04, pub)
    vkey = "%s+%s+%s" % (name, kid.hex(), base64.b64encode(b"\x04" + pub).decode())
    state = {}  # origin -> (size, root)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, code, body=b"", ctype="text/plain; charset=utf-8"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if self.path != "/add-checkpoint":
                return self.answer(404, b"no such endpoint\n")
            n = int(self.headers.get("Content-Length", "0"))
            req = self.rfile.read(n).decode()
            try:
                head, note = req.split("\n\n", 1)
                lines = head.split("\n")
                assert lines[0].startswith("old ")
                old = int(lines[0][4:])
                assert str(old) == lines[0][4:]
                proof = [base64.b64decode(x, validate=True) for x in lines[1:]]
                assert all(len(p) == 32 for p in proof) and len(proof) <= 63
                text, sigs = split_note(note)
                origin = text.split("\n")[0]
            except Exception:
                return self.answer(400, b"malformed request\n")
            if origin != log["name"]:
                return self.answer(404, b"unknown log\n")
            results = [verify_sig(log, text, s) for s in sigs]
            if False in results or True not in results:
                return self.answer(403, b"no valid signature from the log\n")
            body = text.split("\n")
            size, root = int(body[1]), base64.b64decode(body[2])
            if old > size:
                return self.answer(400, b"old size is larger than the checkpoint\n")
            with lock:
                latest = state.get(origin, (0, None))
                if old != latest[0]:
                    return self.answer(409, b"%d\n" % latest[0], "text/x.tlog.size")
                if size == 0 and root != sha256(b""):
                    return self.answer(422, b"bad empty tree\n")
                if old == 0:
                    if proof:
                        return self.answer(422, b"a proof from size 0\n")
                elif old == size:
                    if proof or root != latest[1]:
                        return self.answer(422, b"same size, different root\n")
                elif not verify_consistency(old, size, latest[1], root, proof):
                    return self.answer(422, b"consistency proof does not verify\n")
                state[origin] = (size, root)
            t = int(time.time())
            sig = key.sign(b"cosignature/v1\ntime %d\n" % t + text.encode())
            line = "\u2014 %s %s\n" % (name, base64.b64encode(kid + struct.pack(">Q", t) + sig).decode())
            self.answer(200, line.encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(vkey, flush=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def main(argv):
    cmd = argv[1]
    if cmd == "check":
        base, vkey = argv[2], argv[3]
        rest = argv[4:]
        trusted, witnesses, quorum = None, [], 0
        while rest:
            if rest[0] == "--trusted":
                trusted = (int(rest[1]), base64.b64decode(rest[2]))
                rest = rest[3:]
            elif rest[0] == "--witness":
                witnesses.append(rest[1])
                rest = rest[2:]
            elif rest[0] == "--quorum":
                quorum = int(rest[1])
                rest = rest[2:]
            else:
                raise SystemExit("unknown option %s" % rest[0])
        out = check(base.rstrip("/"), vkey, trusted, witnesses, quorum)
    elif cmd == "receipt":
        out = check_receipt(argv[2], argv[3])
    elif cmd == "witness":
        run_witness(int(argv[2]), argv[3])
        return 0
    else:
        raise SystemExit("unknown command %s" % cmd)
    print(json.dumps(out))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
