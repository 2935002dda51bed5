"""A pickle's shape, read from its opcodes before anything is unpickled.

Unpickling builds whatever structure the opcodes describe, and some structures cost more than
their bytes before any check of ours can look at them (a hostile probe, 2026-12-07):
- a tuple nested a million deep as a dict key (1 MB) crashed the process: hashing it overflowed
  the C stack, in our unpickler and in torch's weights-only one alike;
- a tuple key sharing one tuple twice at each of 40 levels (328 bytes) hashed 2^40 times, and the
  import ran until it was killed.
The scan walks the opcodes once (`pickletools.genops`), keeping for each value on the pickle's
stack and memo only how deeply it nests, and refuses a pickle nested deeper than `MAX_DEPTH` or
whose dict keys and set members are anything but scalars and flat tuples of them (what state
dicts and configurations hold). What it lets through is then unpickled as before.

`check_archive` applies it to the pickle inside a torch.save archive, after bounding how far the
archive's members expand (a nested storage in an NVlabs pickle, deflated 1000:1, grew to 1 GiB)."""
from __future__ import annotations

import io
import pickletools
import zipfile

MAX_DEPTH = 100  # containers within containers; NVlabs' network records nest ~20 deep
MAX_KEY_DEPTH = 1  # a dict key or set member: a scalar (0) or a tuple of scalars (1)
ARCHIVE_MAX_EXPANSION = 16  # a torch.save archive's members may expand at most this much (they are stored, not deflated)


class PickleRefused(ValueError):
    """The pickle or archive is shaped to cost more than it holds; the message says how."""


class Value:
    """One value on the scanned stack or memo: how deep it nests, and for a string its text (a
    global named by STACK_GLOBAL). Shared through the memo, so that filling a container after it
    was memoised deepens every reference to it."""

    __slots__ = ("depth", "text", "called")

    def __init__(self, depth: int = 0, text: str | None = None, called: bool = False) -> None:
        self.depth, self.text = depth, text
        self.called = called  # what a global returned (bytes at protocol 2 are `_codecs.encode(...)`): hashed as that makes it

    def holds(self, *items: "Value") -> None:
        deepest = max((item.depth for item in items), default=0) + 1
        if deepest > MAX_DEPTH:
            raise PickleRefused(f"the pickle nests containers over {MAX_DEPTH} deep: an import refuses it before unpickling")
        self.depth = max(self.depth, deepest)


MARK = object()
CONTAINERS = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"}
CALLS = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}  # the values each pops: the callable (or class) and its arguments
SET_BUILDERS = {"builtins set", "builtins frozenset", "__builtin__ set"}


def check_key(item: Value) -> None:
    if item.depth > MAX_KEY_DEPTH and not item.called:
        raise PickleRefused("the pickle has a dict key or set member that nests containers: state dicts and configurations "
                            "key by names and numbers, and hashing a nested key can cost far more than the file")


def scan_pickle(data: bytes, what: str = "the pickle", start: int = 0) -> int:
    """Refuses (PickleRefused) a pickle (from offset `start`) shaped as the module docstring says;
    returns the offset just past its STOP (torch's older files are several pickles in a row)."""
    stack: list = []
    memo: dict = {}

    def to_mark() -> list[Value]:
        for index in range(len(stack) - 1, -1, -1):
            if stack[index] is MARK:
                items = stack[index + 1:]
                del stack[index:]
                return items
        raise PickleRefused(f"{what} is damaged (a MARK is missing)")

    def pop() -> Value:
        if not stack or stack[-1] is MARK:
            raise PickleRefused(f"{what} is damaged (its stack runs out)")
        return stack.pop()

    def top() -> Value:
        if not stack or stack[-1] is MARK:
            raise PickleRefused(f"{what} is damaged (its stack runs out)")
        return stack[-1]

    try:
        stream = io.BytesIO(data)
        stream.seek(start)
        for opcode, argument, position in pickletools.genops(stream):
            name = opcode.name
            if name == "STOP":
                return position + 1
            if name == "MARK":
                stack.append(MARK)
            elif name in CONTAINERS:
                stack.append(Value(1))
            elif name in ("TUPLE", "LIST"):
                items = to_mark()
                stack.append(Value(1))
                stack[-1].holds(*items)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                items = [pop() for _ in range(int(name[-1]))]
                stack.append(Value(1))
                stack[-1].holds(*items)
            elif name in ("DICT", "FROZENSET"):
                items = to_mark()
                for key in (items[0::2] if name == "DICT" else items):
                    check_key(key)
                stack.append(Value(1))
                stack[-1].holds(*items)
            elif name == "APPEND":
                item = pop()
                top().holds(item)
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = to_mark()
                for key in (items[0::2] if name == "SETITEMS" else items if name == "ADDITEMS" else ()):
                    check_key(key)
                top().holds(*items)
            elif name == "SETITEM":
                value, key = pop(), pop()
                check_key(key)
                top().holds(key, value)
            elif name == "BUILD":
                state = pop()
                top().holds(state)
            elif name in CALLS:
                popped = [pop() for _ in range(CALLS[name])]
                callable_ = popped[-1]
                result = Value(1, called=True)
                result.holds(*popped[:-1])
                if callable_.text in SET_BUILDERS:  # set(([members],)): the members sit two levels inside the arguments
                    check_key(Value(popped[-2].depth - 2))
                stack.append(result)
            elif name in ("OBJ", "INST"):
                items = to_mark()
                stack.append(Value(1))
                stack[-1].holds(*items)
            elif name == "GLOBAL":
                stack.append(Value(0, str(argument)))
            elif name == "STACK_GLOBAL":
                attribute, module = pop(), pop()
                stack.append(Value(0, f"{module.text} {attribute.text}"))
            elif name in ("POP",):
                pop()
            elif name == "POP_MARK":
                to_mark()
            elif name == "DUP":
                stack.append(top())
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[argument] = top()
            elif name == "MEMOIZE":
                memo[len(memo)] = top()
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if argument not in memo:
                    raise PickleRefused(f"{what} is damaged (it reads a memo entry it never wrote)")
                stack.append(memo[argument])
            elif name == "BINPERSID":
                pop()
                stack.append(Value(0))
            elif name in ("PROTO", "FRAME"):
                continue
            else:  # a scalar: numbers, strings, bytes, None, booleans, PERSID, EXT*, buffers
                stack.append(Value(0, argument if isinstance(argument, str) else None))
    except PickleRefused:
        raise
    except ValueError as error:  # genops: an unknown opcode, a truncated argument
        raise PickleRefused(f"{what} is damaged or truncated ({str(error)[:200]})") from None
    raise PickleRefused(f"{what} is damaged or truncated (it has no STOP)")


LEGACY_PICKLES = 5  # torch's older format: magic number, protocol, system info, the object, its storages' keys; raw data follows


def check_legacy(data: bytes, what: str) -> None:
    """torch's older (non-zip) format, as `Tensor.__reduce__` still writes each storage of an
    NVlabs pickle: its pickles pass `scan_pickle` (the raw storage data after them is torch's to
    bound: it refuses a storage declared past its bytes)."""
    offset = 0
    for _ in range(LEGACY_PICKLES):
        offset = scan_pickle(data, what, offset)


def check_archive(data: bytes, what: str = "the archive") -> None:
    """A torch.save zip archive whose members expand at most ARCHIVE_MAX_EXPANSION times and whose
    pickle (`…/data.pkl`) passes `scan_pickle`. Older (non-zip) torch files are refused by the
    callers that need a zip; this says nothing about them."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise PickleRefused(f"{what} is damaged or truncated" if data[:2] == b"PK" else f"{what} is not a torch.save archive")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # torch.save stores its members; a deflated one may be a bomb
        members = archive.infolist()
        expanded = sum(member.file_size for member in members)
        if expanded > ARCHIVE_MAX_EXPANSION * len(data) + 2**20:
            raise PickleRefused(f"{what}'s members expand to {expanded} bytes from {len(data)}: torch.save does not compress, so it is not imported")
        pickles = [member for member in members if member.filename.endswith("data.pkl")]
        if len(pickles) != 1:
            raise PickleRefused(f"{what} holds {len(pickles)} pickles (data.pkl), where torch.save writes one")
        scan_pickle(archive.read(pickles[0]), f"{what}'s pickle")
