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

An export holds no case records, so entries removed from the end of a history
cannot be seen here: `govflow audit verify` on the store checks those too.
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


def read_entries(stream, problems):
    """Parses the export; returns {case_id: [Row]} in file order."""
    cases = {}
    for number, raw in enumerate(stream, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            entry = json.loads(text)
        except ValueError as e:
            problems.append(Problem(None, None, number, "unreadable", "not JSON: %s" % e))
            continue
        if not isinstance(entry, dict):
            problems.append(Problem(None, None, number, "unreadable", "not a JSON object"))
            continue
        bad = [k for k, t in REQUIRED.items()
               if not isinstance(entry.get(k), t) or (t is int and isinstance(entry.get(k), bool))]
        if bad:
            problems.append(Problem(entry.get("case_id") if isinstance(entry.get("case_id"), str) else None,
                                    None, number, "unreadable",
                                    "missing or mistyped member(s): %s" % ", ".join(bad)))
            continue
        cases.setdefault(entry["case_id"], []).append(Row(number, entry, entry_hash(entry)))
    return cases


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
    paths = []
    for arg in argv[1:]:
        if arg == "--partial":
            partial = True
        elif arg == "--allow-empty":
            allow_empty = True
        elif arg == "--quiet":
            quiet = True
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
                cases = read_entries(stream, problems)
        else:
            stream = open(sys.stdin.fileno(), encoding="utf-8", closefd=False)
            cases = read_entries(stream, problems)
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
    for case_id in sorted(cases):
        rows = cases[case_id]
        entries += len(rows)
        before = len(problems)
        if check_case(case_id, rows, partial, problems):
            late += 1
        if not quiet and len(problems) == before:
            print("ok   %s: %d entries, chain intact" % (case_id, len(rows)))

    for problem in problems:
        print("BAD  %s" % problem)
    bad_cases = len({p.case_id for p in problems})
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
