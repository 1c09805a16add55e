#!/usr/bin/env python3
"""Verify a govflow history export (JSON Lines) without trusting govflow.

Usage: verify_export.py [--partial | --since] [--allow-empty] [--quiet] [--without-heads]
                        [--without-end] [FILE]

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

--partial      accept chains that do not start at sequence 1, nor reach the
               entry their head line seals (an export filtered by time, with
               --until, or --since and --until); the first entry's
               previous_hash is then not checked.
--since        for an export filtered with --since alone, which runs to the
               end of each history: accept chains that start late, but each
               must still reach the entry its head line seals.
--allow-empty  accept an empty input (an export whose filters may select
               nothing).
--quiet        print only the problems and the summary line.

Each case's entries are followed by its head line, {"case_id", "head_sequence",
"head_hash"}: the last entry its case record seals. The last entry of the case
must be that one, so entries removed from, rewritten at or added to the end
of a history are seen too (with --partial, only when the export reaches the
end, or with --since). A line with a member named twice, or with members other than those of
docs/hash-chain.md, is refused: readers that keep the first or the last of
two would see different entries.

--without-heads  accept cases without a head line (exports by govflow before
                 2026-11-27 have none); their ends are then not checked.

The export ends with one end line, {"end_of_export": true, "cases",
"entries", "left_out", "sha256"}: how many cases and entry lines come before
it, how many records the exporter could not read and left out (an export
that left any out is incomplete, a problem), and the SHA-256 (hex) of every
byte before it. An export without one was cut short
(even at a case boundary); one whose counts or digest do not match had lines
removed, added or changed, whole cases included. The digest it computes is
printed with the summary: compare it with the one `govflow audit export`
printed when it wrote the file, kept apart from it, to know the file is the
one written and not one recomputed after a change.

--without-end    accept an export without an end line (exports by govflow
                 before the end line was added have none; --without-heads
                 implies it, since exports without heads are older still).

The layout of docs/hash-chain.md is checked too ("misplaced"): each case's
entries together in one block, the blocks in case-id order, and a case's head
line right after its last entry (not before its entries, nor among another
case's).

The export is read as bytes and each line decoded on its own: a line that is
not UTF-8, not JSON, nested too deeply or holding an integer too long to read
is reported ("unreadable", with its line) and the other lines are still
checked. A UTF-8 byte-order mark at the very start of the file (as some
editors save one) is ignored, with a note; anywhere else it is a problem.

Standard library only.
"""

import bisect
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
END_MEMBERS = {"end_of_export": bool, "cases": int, "entries": int, "left_out": int,
               "sha256": str}


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


class End:
    """The export's end line, and what the lines before it hold."""

    def __init__(self, line, fields, computed):
        self.line = line
        self.fields = fields
        # SHA-256 (hex) of the bytes before the end line.
        self.computed = computed


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


class IntegerTooLong(Exception):
    """An integer in a line too long for Python to read (sys.get_int_max_str_digits)."""

    def __init__(self, digits):
        Exception.__init__(self, digits)
        self.digits = digits


def parse_int(text):
    """json's integers, with a plain error for one too long to convert."""
    try:
        return int(text)
    except ValueError:
        raise IntegerTooLong(len(text.lstrip("-")))


class Unreadable(Exception):
    """The export as a whole cannot be read."""


BOM = b"\xef\xbb\xbf"


def parse_line(text):
    """The JSON value on one line, or raises ValueError with a plain reason."""
    try:
        return json.loads(text, object_pairs_hook=unique_members, parse_int=parse_int)
    except IntegerTooLong as e:
        raise ValueError("an integer %d digits long, too long to read (an export's integers "
                         "have at most 16 digits)" % e.digits)
    except RecursionError:
        raise ValueError("objects or arrays nested too deeply to read (more than about %d "
                         "levels; govflow's entries are never nested that deeply)"
                         % sys.getrecursionlimit())
    except ValueError as e:
        if text.startswith("\ufeff"):
            raise ValueError("the line starts with a byte-order mark (U+FEFF), which only the very "
                             "start of the file may have (were files joined?)")
        raise ValueError("not JSON: %s" % e)


def read_entries(stream, problems, notes):
    """Parses the export (a binary stream), line by line; returns ({case_id:
    [Row]} in file order, {case_id: [(line, head_sequence, head_hash)]}, the
    layout: (line, case_id, is_head) of each entry line and well-formed head
    line, in file order, the end line (an End, or None), and the entry lines
    before the end line, read or not)."""
    cases = {}
    heads = {}
    layout = []
    end = None
    entry_lines = 0
    digest = hashlib.sha256()
    for number, raw in enumerate(stream, start=1):
        skipped = 0
        if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise Unreadable("it is UTF-16 text (it starts with a UTF-16 byte-order mark), not "
                             "UTF-8 as govflow writes it: save it as UTF-8")
        if number == 1 and raw.startswith(BOM):
            # A byte-order mark, as some editors save UTF-8: not part of any entry.
            raw = raw[len(BOM):]
            skipped = len(BOM)
            notes.append("the export starts with a UTF-8 byte-order mark (as some editors save "
                         "files): it was ignored")
        if end is not None and raw.strip():
            problems.append(Problem(None, None, number, "misplaced",
                                    "a line after the export's end line (line %d): lines were added "
                                    "or files joined" % end.line))
            continue
        before = digest.copy()
        digest.update(raw)
        if raw.strip():
            # Every line but head and end lines is an entry, read or not.
            entry_lines += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(None, None, number, "unreadable",
                                    "not UTF-8 text: byte %d of the line (0x%02x) is not valid UTF-8"
                                    % (e.start + skipped + 1, raw[e.start])))
            continue
        text = text.strip()
        if not text:
            continue
        try:
            entry = parse_line(text)
        except ValueError as e:
            problems.append(Problem(None, None, number, "unreadable", str(e)))
            continue
        if not isinstance(entry, dict):
            problems.append(Problem(None, None, number, "unreadable", "not a JSON object"))
            continue
        case_id = entry.get("case_id") if isinstance(entry.get("case_id"), str) else None
        if "end_of_export" in entry:
            bad = mistyped(entry, END_MEMBERS) + sorted(set(entry) - set(END_MEMBERS))
            if bad or entry["end_of_export"] is not True:
                problems.append(Problem(None, None, number, "unreadable",
                                        "an end line with missing, mistyped or unknown member(s): %s"
                                        % ", ".join(bad or ["end_of_export"])))
                continue
            end = End(number, entry, before.hexdigest())
            entry_lines -= 1
            continue
        if "head_hash" in entry:
            bad = mistyped(entry, HEAD_MEMBERS) + sorted(set(entry) - set(HEAD_MEMBERS))
            if bad:
                problems.append(Problem(case_id, None, number, "unreadable",
                                        "a head line with missing, mistyped or unknown member(s): %s"
                                        % ", ".join(bad)))
                continue
            heads.setdefault(case_id, []).append((number, entry["head_sequence"], entry["head_hash"]))
            entry_lines -= 1
            layout.append((number, case_id, True))
            continue
        if case_id is not None:
            layout.append((number, case_id, False))
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
        except RecursionError:
            problems.append(Problem(case_id, entry["sequence"], number, "unreadable",
                                    "objects or arrays nested too deeply to hash (more than about "
                                    "%d levels)" % sys.getrecursionlimit()))
            continue
        cases.setdefault(case_id, []).append(Row(number, entry, computed))
    return cases, heads, layout, end, entry_lines


def check_end(end, cases, entry_lines, without_end, problems, notes):
    """Checks the end line against what comes before it."""
    if end is None:
        if not without_end:
            problems.append(Problem(None, None, None, "missing",
                                    "no end line: the export was cut short, perhaps at a case "
                                    "boundary (exports by govflow before end lines have none: check "
                                    "those with --without-end)"))
        return
    fields = end.fields
    if fields["entries"] != entry_lines or fields["cases"] != len(cases):
        problems.append(Problem(None, None, end.line, "missing" if fields["entries"] > entry_lines
                                else "forged",
                                "the end line counts %d entries of %d cases; the export holds %d "
                                "entry lines of %d cases: lines were removed or added" % (fields["entries"],
                                                                     fields["cases"], entry_lines,
                                                                     len(cases))))
    if fields["sha256"] != end.computed:
        problems.append(Problem(None, None, end.line, "altered",
                                "the SHA-256 of the export before its end line is %s, not the %s "
                                "the end line seals: lines were changed, removed or added"
                                % (end.computed, fields["sha256"])))
    if fields["left_out"]:
        # The export is knowingly incomplete: its chains may all check, but
        # what was left out (a whole case, perhaps its only one) is unverified.
        problems.append(Problem(None, None, end.line, "missing",
                                "the exporter left out %d record(s) it could not read, so the "
                                "export is incomplete (`govflow audit verify` on the store names "
                                "them)" % fields["left_out"]))


def check_layout(layout, cases, heads, problems):
    """Checks the layout of docs/hash-chain.md: each case's entries in one
    block, the blocks in case-id order, and the case's head line right after
    its last entry. Lines that cannot be read, and head lines of cases with no
    entries or named twice (reported elsewhere), do not count."""
    entries = [(line, case_id) for line, case_id, is_head in layout if not is_head]
    sequence_at = {row.line: row.sequence for rows in cases.values() for row in rows}

    def problem(case_id, line, detail):
        problems.append(Problem(case_id, sequence_at.get(line), line, "misplaced", detail))

    # Blocks: runs of entry lines of one case (head lines between them do not count).
    blocks = []  # [case_id, first line, last line]
    for line, case_id in entries:
        if blocks and blocks[-1][0] == case_id:
            blocks[-1][2] = line
        else:
            blocks.append([case_id, line, line])
    ended = {}  # case id -> last line of its first block
    for i, (case_id, first, last) in enumerate(blocks):
        if i > 0:
            before_id, _, before_last = blocks[i - 1]
            if case_id in ended:
                problem(case_id, first,
                        "the case's entries are split: these come after case %s's (line %d), "
                        "apart from the case's earlier ones (ending on line %d); an export holds "
                        "each case's entries together" % (before_id, before_last, ended[case_id]))
            elif case_id < before_id:
                problem(case_id, first,
                        "case %s comes after case %s (line %d): an export lists the cases in "
                        "case-id order" % (case_id, before_id, before_last))
        ended.setdefault(case_id, last)

    # Head lines: the first of each case with entries, right after its last entry.
    entry_lines = [line for line, _ in entries]
    for case_id, case_heads in heads.items():
        own = [line for line, c in entries if c == case_id]
        if not own:
            continue  # a head line for a case with no entries: reported as missing
        line = case_heads[0][0]
        at = bisect.bisect_left(entry_lines, line)
        previous = entries[at - 1] if at > 0 else None
        following = entries[at] if at < len(entries) else None
        if following is not None and following[1] == case_id:
            if previous is not None and previous[1] == case_id:
                detail = ("entries of the case follow the head line (from line %d): it belongs "
                          "right after the case's last entry" % following[0])
            else:
                detail = ("the head line comes before the case's entries (from line %d): it belongs "
                          "right after the case's last entry" % following[0])
        elif previous is None or previous[1] != case_id:
            if previous is not None and following is not None and previous[1] == following[1]:
                where = "among case %s's entries (lines %d and %d)" % (previous[1], previous[0],
                                                                       following[0])
            elif previous is not None:
                where = "after case %s's entry on line %d" % (previous[1], previous[0])
            else:
                where = "before any entry"
            detail = ("the head line stands %s, not right after its own case's last entry "
                      "(line %d)" % (where, own[-1]))
        else:
            continue
        problems.append(Problem(case_id, None, line, "misplaced", detail))


def check_head(case_id, rows, heads, ends_early, without_heads, already, problems):
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
        if not ends_early:
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
    # Case ids are printed as read: one holding a lone surrogate escape is
    # shown escaped instead of stopping the report.
    for out in (sys.stdout, sys.stderr):
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="backslashreplace")
    partial = False
    since = False
    allow_empty = False
    quiet = False
    without_heads = False
    without_end = False
    paths = []
    for arg in argv[1:]:
        if arg == "--partial":
            partial = True
        elif arg == "--since":
            since = True
        elif arg == "--allow-empty":
            allow_empty = True
        elif arg == "--quiet":
            quiet = True
        elif arg == "--without-heads":
            without_heads = True
            without_end = True
        elif arg == "--without-end":
            without_end = True
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
    notes = []
    try:
        if paths and paths[0] != "-":
            with open(paths[0], "rb") as stream:
                cases, heads, layout, end, entry_lines = read_entries(stream, problems, notes)
        else:
            stream = open(sys.stdin.fileno(), "rb", closefd=False)
            cases, heads, layout, end, entry_lines = read_entries(stream, problems, notes)
    except (OSError, Unreadable) as e:
        print("verify_export.py: cannot read the export: %s" % e, file=sys.stderr)
        return 2

    if not cases and not problems and not allow_empty:
        if end is not None and end.fields.get("left_out"):
            print("verify_export.py: the export holds no entries, and its end line says %d "
                  "record(s) were left out because they could not be read: nothing was verified "
                  "(`govflow audit verify` on the store names them)" % end.fields["left_out"],
                  file=sys.stderr)
            return 1
        if end is not None:
            print("verify_export.py: the export holds no entries (its end line says the export's "
                  "filters selected none): nothing was verified; pass --allow-empty if no entries "
                  "are expected", file=sys.stderr)
        else:
            print("verify_export.py: the export is empty: nothing was verified (did `govflow audit "
                  "export` fail? see its message); pass --allow-empty if no entries are expected",
                  file=sys.stderr)
        return 2
    check_end(end, cases, entry_lines, without_end, problems, notes)

    if not quiet:
        for note in notes:
            print("note: %s" % note)
    # The layout is checked apart: its problems do not explain any entry's
    # content, so the head checks below must not count them as named.
    misplaced = []
    check_layout(layout, cases, heads, misplaced)
    misplaced_cases = {p.case_id for p in misplaced}

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
        if check_case(case_id, rows, partial or since, problems):
            late += 1
        already = named.get(case_id, set()) | {p.sequence for p in problems[before:]}
        check_head(case_id, rows, heads.get(case_id), partial, without_heads, already, problems)
        if not quiet and len(problems) == before and case_id not in misplaced_cases:
            print("ok   %s: %d entries, chain intact" % (case_id, len(rows)))

    for case_id in sorted(set(heads) - set(cases), key=str):
        for line, _, _ in heads[case_id]:
            problems.append(Problem(case_id, None, line, "missing",
                                    "a head line for a case none of whose entries is in the export"))

    problems.extend(misplaced)
    for problem in problems:
        print("BAD  %s" % problem)
    if end is not None:
        print("SHA-256 of the export before its end line: %s (compare it with the one `govflow "
              "audit export` printed)" % end.computed)
    bad_cases = len({p.case_id for p in problems if p.case_id is not None})
    if problems:
        print("%d problem(s) in %d case(s); %d entries in %d cases checked"
              % (len(problems), bad_cases, entries, len(cases)))
        if late:
            print("hint: %d case(s) start after sequence 1, as they do in an export filtered by time "
                  "(--since/--until): check such an export with --since (it runs to the end) "
                  "or --partial (with --until)" % late)
        return 1
    if not cases:
        print("the export is empty, as --allow-empty allows: nothing to verify")
        return 0
    print("all %d entries in %d cases verified" % (entries, len(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
