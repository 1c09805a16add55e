#!/usr/bin/env python3
"""Makes the small exports in this folder, which tests/audit.rs runs
tools/verify_export.py on (`python3 make.py` here rewrites them).

A sound export of three cases (a: 3 entries, b: 3, c: 1), with the hashes of
docs/hash-chain.md, and copies of it damaged one way each. Each copy ends
with an end line made for its own content, as if govflow had written it, so
that only the damage it is made for shows; the files made to test end lines
(the last ones) are the exceptions."""

import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DIGEST = hashlib.sha256(b"ledger.ron").hexdigest()


def entry_hash(entry):
    body = {k: v for k, v in entry.items() if k != "hash"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()


def line(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def case(case_id, steps):
    """The lines of one case: its entries, then its head line."""
    lines = []
    previous = ""
    state = ""
    for sequence, (event, to_state, payload) in enumerate(steps, start=1):
        entry = {
            "case_id": case_id,
            "sequence": sequence,
            "time": "2026-03-0%dT08:00:00Z" % sequence,
            "actor": {"agency": "fgw"},
            "event": event,
            "payload": payload,
            "from_state": state,
            "to_state": to_state,
            "variables_changed": {},
            "bindings_changed": {"owner": "fgw"} if sequence == 1 else {},
            "timers_set": [],
            "timers_cancelled": [],
            "calendar_version": "",
            "workflow_digest": DIGEST,
            "request_id": "req-%s-%d" % (case_id, sequence),
            "previous_hash": previous,
        }
        entry["hash"] = previous = entry_hash(entry)
        state = to_state
        lines.append(line(entry))
    lines.append(line({"case_id": case_id, "head_sequence": len(steps), "head_hash": previous}))
    return lines


A = case("a", [("start", "draft", {}), ("submit", "review", {"note": "材料齐全"}),
               ("approve", "done", {})])
B = case("b", [("start", "draft", {}), ("submit", "review", {"note": "第二次"}),
               ("reject", "closed", {})])
C = case("c", [("start", "draft", {})])


def body(lines):
    return "".join(l + "\n" for l in lines).encode()


def end(lines, left_out=0):
    """The end line govflow writes after `lines`."""
    entries = [l for l in lines if '"head_hash"' not in l]
    cases = set()
    for l in entries:
        try:
            cases.add(json.loads(l)["case_id"])
        except (ValueError, RecursionError, KeyError):
            pass  # a damaged line
    return line({
        "cases": len(cases),
        "end_of_export": True,
        "entries": len(entries),
        "left_out": left_out,
        "sha256": hashlib.sha256(body(lines)).hexdigest(),
    })


def write(name, lines, prefix=b"", sealed=True):
    data = prefix + body(lines + [end(lines)] if sealed else lines)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


write("sound.jsonl", A + B + C)
# As govflow wrote exports before head and end lines.
write("headless.jsonl", [l for l in A + B + C if "head_hash" not in l], sealed=False)
# Saved by an editor that writes a UTF-8 byte-order mark.
write("bom.jsonl", A + B + C, prefix=b"\xef\xbb\xbf")
# Between cases a and b, a line nested 2000 levels deep.
write("deep.jsonl", A + ['{"a":' * 2000 + "1" + "}" * 2000] + B + C)
# In entry 2 of case b, an integer 5000 digits long.
write("long_integer.jsonl", A + [B[0], B[1].replace('"note":"第二次"', '"note":' + "9" * 5000)]
      + B[2:] + C)
# Entry 2 of case b holds one byte that is not UTF-8 (a Latin-1 "é"); the end
# line seals the export as written, before the byte was changed.
with open(os.path.join(HERE, "not_utf8.jsonl"), "wb") as f:
    for l in A + B + C + [end(A + B + C)]:
        data = l.encode()
        if l is B[1]:
            data = data.replace("第二次".encode(), b"caf\xe9")
        f.write(data + b"\n")
# Case a's head line before its entries.
write("head_first.jsonl", [A[3]] + A[:3] + B + C)
# Case b's head line among case a's entries.
write("head_among_others.jsonl", A[:2] + [B[3]] + A[2:] + B[:3] + C)
# Case a's last entry (and head) after case b: the case in two blocks.
write("split_case.jsonl", A[:2] + B + A[2:] + C)
# Case b before case a.
write("cases_out_of_order.jsonl", B + A + C)

# Cut short at a case boundary: every chain is sound, but the end line is gone.
write("cut_at_case.jsonl", A + B, sealed=False)
# Case b taken out, the end line kept.
write("case_removed.jsonl", A + C + [end(A + B + C)], sealed=False)
# Case b taken out and the end line made again: only the digest kept apart
# from the file shows it.
write("case_removed_resealed.jsonl", A + C)
# A line added after the end line.
write("after_end.jsonl", A + B + C + [end(A + B + C)] + C[:1], sealed=False)
# The exporter said it left a record out: complete chains, incomplete export.
write("left_out.jsonl", A + B + C + [end(A + B + C, left_out=1)], sealed=False)
