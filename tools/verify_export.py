#!/usr/bin/env python3
"""Verify a govflow history export (JSON Lines) without trusting govflow.

Usage: verify_export.py [--partial] [--allow-empty] [--quiet] [FILE]

Reads the export (FILE, or standard input), recomputes every entry's hash with
the canonical encoding of docs/hash-chain.md, and checks each case's chain:
sequence numbers 1, 2, ... in order, each previous_hash equal to the hash of
the entry before. Prints one line per problem, naming the case, the sequence
number and the line of the export (for entries missing from a chain: the
first one missing, and the line of the entry after them), then a summary.
Exits 0 when everything checks, 1 when a problem was found, 2 when the input
cannot be read or is empty.

An empty input is an error: a failed export (`govflow audit export ... |
verify_export.py`) writes nothing, and nothing must not pass for a verified
history.

--partial      accept chains that do not start at sequence 1 (an export
               filtered by time, with --since or --until); the first entry's
               previous_hash is then not checked.
--allow-empty  accept an empty input (an export whose filters may select
               nothing).
--quiet        print only the problems and the summary line.

Each case's entries are followed by its head line, {"case_id", "head_sequence",
"head_hash"}: the last entry its case record seals. The last entry of the case
must be that one, so entries removed from, rewritten at or added to the end
of a history are seen too (with --partial, only when the export reaches the
end). A line with a member named twice, or with members other than those of
docs/hash-chain.md, is refused: readers that keep the first or the last of
two would see different entries.

--without-heads  accept cases without a head line (exports by govflow before
                 2026-11-27 have none); their ends are then not checked.

Standard library only.
"""

import hashlib
import json
import sys

REQUIRED = {
    "case_id": str,
    "sequence": int,
    "hash": str,
    "previous_hash": str,
}

# Every member of an entry line (docs/hash-chain.md), and of a head line.
ENTRY_MEMBERS = {
    "case_id", "sequence", "time", "actor", "event", "payload", "from_state", "to_state",
    "variables_changed", "bindings_changed", "timers_set", "timers_cancelled",
    "calendar_version", "workflow_digest", "request_id", "previous_hash", "hash",
}
HEAD_MEMBERS = {"case_id": str, "head_sequence": int, "head_hash": str}


def unique_members(pairs):
    """A JSON object whose members are all named once."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError("member %r is named twice" % key)
        seen[key] = value
    return seen


def entry_hash(entry):
    """SHA-256 (hex) of the entry's JSON without `hash`: keys sorted, compact, UTF-8."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()


class Problem:
    def __init__(self, case_id, sequence, line, kind, detail, before=None):
        self.case_id = case_id
        self.sequence = sequence
        self.line = line
        self.kind = kind
        self.detail = detail
        # For entries missing from the export: the sequence number of the
        # entry on `line`, which comes after them.
        self.before = before

    def __str__(self):
        where = "case %s" % self.case_id if self.case_id is not None else "export"
        if self.sequence is not None:
            where += " sequence %d" % self.sequence
        if self.line is not None and self.before is not None:
            where += " (before line %d, which holds sequence %d)" % (self.line, self.before)
        elif self.line is not None:
            where += " (line %d)" % self.line
        return "%s: %s: %s" % (where, self.kind, self.detail)


class Row:
    """What the checks need of one exported entry (the entry itself is not kept)."""

    __slots__ = ("line", "sequence", "hash", "previous_hash", "computed")

    def __init__(self, line, entry, computed):
        self.line = line
        self.sequence = entry["sequence"]
        self.hash = entry["hash"]
        self.previous_hash = entry["previous_hash"]
        self.computed = computed


def mistyped(line, members):
    """Names of `members` (name -> type) missing from `line` or of another type."""
    return [k for k, t in members.items()
            if not isinstance(line.get(k), t) or (t is int and isinstance(line.get(k), bool))]


def read_entries(stream, problems):
    """Parses the export; returns ({case_id: [Row]} in file order,
    {case_id: [(line, head_sequence, head_hash)]})."""
    cases = {}
    heads = {}
    for number, raw in enumerate(stream, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            entry = json.loads(text, object_pairs_hook=unique_members)
        except ValueError as e:
            problems.append(Problem(None, None, number, "unreadable", "not JSON: %s" % e))
            continue
        if not isinstance(entry, dict):
            problems.append(Problem(None, None, number, "unreadable", "not a JSON object"))
            continue
        case_id = entry.get("case_id") if isinstance(entry.get("case_id"), str) else None
        if "head_hash" in entry:
            bad = mistyped(entry, HEAD_MEMBERS) + sorted(set(entry) - set(HEAD_MEMBERS))
            if bad:
                problems.append(Problem(case_id, None, number, "unreadable",
                                        "a head line with missing, mistyped or unknown member(s): %s"
                                        % ", ".join(bad)))
                continue
            heads.setdefault(case_id, []).append((number, entry["head_sequence"], entry["head_hash"]))
            continue
        bad = mistyped(entry, REQUIRED)
        unknown = sorted(set(entry) - ENTRY_MEMBERS)
        missing = sorted(ENTRY_MEMBERS - set(entry) - set(REQUIRED))
        if bad or unknown or missing:
            said = []
            if bad or missing:
                said.append("missing or mistyped member(s): %s" % ", ".join(bad + missing))
            if unknown:
                said.append("member(s) an entry does not have: %s" % ", ".join(unknown))
            problems.append(Problem(case_id, None, number, "unreadable", "; ".join(said)))
            continue
        try:
            computed = entry_hash(entry)
        except UnicodeEncodeError:
            problems.append(Problem(case_id, entry["sequence"], number, "unreadable",
                                    "it holds text that is not Unicode (a lone surrogate escape)"))
            continue
        cases.setdefault(case_id, []).append(Row(number, entry, computed))
    return cases, heads


def check_head(case_id, rows, heads, partial, without_heads, already, problems):
    """Checks that the case's last entry is the one its head line names;
    `already` holds the sequence numbers of the case already named."""
    if not heads:
        if not without_heads:
            last = max(rows, key=lambda r: r.sequence)
            problems.append(Problem(case_id, None, last.line, "no head",
                                    "no head line follows the case's entries, so entries removed from "
                                    "or added at its end cannot be seen (exports by govflow before "
                                    "2026-11-27 have none: check those with --without-heads)"))
        return
    for line, _, _ in heads[1:]:
        problems.append(Problem(case_id, None, line, "duplicate", "a second head line for the case"))
    line, sequence, head_hash = heads[0]
    last = max(rows, key=lambda r: r.sequence)
    if last.sequence > sequence:
        if any(sequence < s <= last.sequence for s in already if s is not None):
            return  # the entries past the head are named already
        problems.append(Problem(case_id, sequence + 1, line, "forged",
                                "the history goes on to entry %d past its head, entry %d: added after "
                                "it was sealed" % (last.sequence, sequence)))
    elif last.sequence < sequence:
        if not partial:
            problems.append(Problem(case_id, last.sequence + 1, line, "missing",
                                    "entries %d to %d are missing from the end (the head seals entry %d)"
                                    % (last.sequence + 1, sequence, sequence)
                                    if sequence > last.sequence + 1 else
                                    "entry %d is missing from the end (the head seals it)" % sequence))
    elif sequence not in already and head_hash != last.hash:
        problems.append(Problem(case_id, sequence, last.line, "altered",
                                "the last entry is not the one the head seals (%s): it was rewritten"
                                % head_hash[:16]))


def check_case(case_id, rows, partial, problems):
    """Checks one case's entries; appends its problems. Returns whether the
    chain starts after sequence 1 (only reported without `partial`)."""
    starts_late = False
    unsound = set()  # sequence numbers of entries with a problem of their own

    def report(row, kind, detail):
        problems.append(Problem(case_id, row.sequence, row.line, kind, detail))
        unsound.add(row.sequence)

    # Hashes.
    for row in rows:
        if row.hash != row.computed:
            report(row, "altered",
                   "the stored hash %s is not the hash of the entry's content (%s)"
                   % (row.hash[:16] or "(empty)", row.computed[:16]))

    # Order in the export: the entries must come by sequence number.
    in_order = sorted(row.sequence for row in rows)
    for position, row in enumerate(rows):
        if row.sequence != in_order[position]:
            report(row, "reordered",
                   "entry %d stands where entry %d belongs" % (row.sequence, in_order[position]))

    # Duplicates.
    seen = {}
    for row in rows:
        if row.sequence in seen:
            report(row, "duplicate", "sequence %d also on line %d" % (row.sequence, seen[row.sequence]))
        else:
            seen[row.sequence] = row.line

    by_sequence = sorted(rows, key=lambda r: r.sequence)
    first_with_hash = {}
    for row in by_sequence:
        first_with_hash.setdefault(row.hash, row.sequence)

    # Gaps, and the links between consecutive entries.
    previous = None
    for row in by_sequence:
        s = row.sequence
        if previous is None:
            if s < 1:
                report(row, "reordered", "sequence numbers start at 1")
            elif s > 1 and not partial:
                starts_late = True
                problems.append(Problem(case_id, 1, row.line, "missing",
                                        "entries 1 to %d are missing (the case's first entry in the export is %d)"
                                        % (s - 1, s)
                                        if s > 2 else "entry 1 is missing (the case's first entry in the export is 2)",
                                        before=s))
            elif s == 1 and row.previous_hash != "" and s not in unsound:
                report(row, "forged",
                       "the first entry names a previous hash: an entry was inserted before it "
                       "or it was forged")
        else:
            p = previous.sequence
            if s == p:
                pass  # a duplicate, reported above
            elif s > p + 1:
                problems.append(Problem(case_id, p + 1, row.line, "missing",
                                        "entry %d is missing (the next entry is %d)" % (p + 1, s)
                                        if s == p + 2 else
                                        "entries %d to %d are missing (the next entry is %d)" % (p + 1, s - 1, s),
                                        before=s))
            elif p not in unsound and s not in unsound:
                link = row.previous_hash
                if link != previous.hash and link != previous.computed:
                    later = first_with_hash.get(link)
                    if later is not None and later > s:
                        report(row, "reordered", "it links to entry %d, which comes after it" % later)
                    else:
                        report(row, "forged",
                               "its hash is right but its previous_hash %s does not match entry %d "
                               "(%s): inserted or forged"
                               % (link[:16] or "(empty)", p, previous.hash[:16]))
        previous = row
    return starts_late


def main(argv):
    partial = False
    allow_empty = False
    quiet = False
    without_heads = False
    paths = []
    for arg in argv[1:]:
        if arg == "--partial":
            partial = True
        elif arg == "--allow-empty":
            allow_empty = True
        elif arg == "--quiet":
            quiet = True
        elif arg == "--without-heads":
            without_heads = True
        elif arg in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        elif arg.startswith("--"):
            print("verify_export.py: unknown option %s (see --help)" % arg, file=sys.stderr)
            return 2
        else:
            paths.append(arg)
    if len(paths) > 1:
        print("verify_export.py: give at most one file (or none, for standard input)", file=sys.stderr)
        return 2

    problems = []
    try:
        if paths and paths[0] != "-":
            with open(paths[0], encoding="utf-8") as stream:
                cases, heads = read_entries(stream, problems)
        else:
            stream = open(sys.stdin.fileno(), encoding="utf-8", closefd=False)
            cases, heads = read_entries(stream, problems)
    except (OSError, UnicodeDecodeError) as e:
        print("verify_export.py: cannot read the export: %s" % e, file=sys.stderr)
        return 2

    if not cases and not problems and not allow_empty:
        print("verify_export.py: the export is empty: nothing was verified (did `govflow audit "
              "export` fail? see its message); pass --allow-empty if no entries are expected",
              file=sys.stderr)
        return 2

    entries = 0
    late = 0
    # Entries named while reading, by case: a head check does not name them again.
    named = {}
    for problem in problems:
        named.setdefault(problem.case_id, set()).add(problem.sequence)
    for case_id in sorted(cases):
        rows = cases[case_id]
        entries += len(rows)
        before = len(problems)
        if check_case(case_id, rows, partial, problems):
            late += 1
        already = named.get(case_id, set()) | {p.sequence for p in problems[before:]}
        check_head(case_id, rows, heads.get(case_id), partial, without_heads, already, problems)
        if not quiet and len(problems) == before:
            print("ok   %s: %d entries, chain intact" % (case_id, len(rows)))

    for case_id in sorted(set(heads) - set(cases), key=str):
        for line, _, _ in heads[case_id]:
            problems.append(Problem(case_id, None, line, "missing",
                                    "a head line for a case none of whose entries is in the export"))

    for problem in problems:
        print("BAD  %s" % problem)
    bad_cases = len({p.case_id for p in problems if p.case_id is not None})
    if problems:
        print("%d problem(s) in %d case(s); %d entries in %d cases checked"
              % (len(problems), bad_cases, entries, len(cases)))
        if late:
            print("hint: %d case(s) start after sequence 1, as they do in an export filtered by time "
                  "(--since/--until): check such an export with --partial" % late)
        return 1
    if not cases:
        print("the export is empty, as --allow-empty allows: nothing to verify")
        return 0
    print("all %d entries in %d cases verified" % (entries, len(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
