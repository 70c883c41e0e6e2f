"""Fast, strict decoders of the contract's events: msgspec structs derived from the
pydantic models of `schemas.events`, the one fast decoder of the project.

The pydantic models stay the contract (and the JSON Schema), but pydantic costs 10-40 µs
per event, more than what the stream join or the sink then does with it. `struct_of(model)`
derives, once per model, a msgspec struct with the same fields, types, bounds, patterns,
defaults, unknown-field rule and properties, whose `__post_init__` runs the model's own
`after` validators; msgspec checks all of it in C while it parses. Being derived, the
structs follow every schema change without a hand-written copy to keep in step.

The rule: the fast path is never more lenient than the model. Where the two could
differ, msgspec is the stricter (no lax coercions such as "5" -> 5, integers within 64
bits, `$` anchors made absolute). Anything it refuses goes to pydantic
(`model_validate_json`, then `schemas.codec.decode`), which gives the verdict and the
`InvalidEvent` naming the field: `decode_generation` and `decode_feedback` therefore
accept and reject exactly what pydantic does. Input that only pydantic's lax mode accepts
comes back as the pydantic model, which has the same attributes as the struct.

A model using something the translation does not know (an alias, a field validator, a
before-validator, an unknown constraint) gets no fast decoder (`fast_decoder` -> None):
its users validate with pydantic. tests/test_schemas_fast.py checks both directions with
hypothesis, for every public topic.

Users: the stream join (streams/join.py, streams/changelog.py) and the sink
(services/sink/worker.py).
"""

from __future__ import annotations

import collections.abc
import enum
import operator
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import msgspec
import orjson
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from schemas import events as ev
from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, decode


class Unsupported(TypeError):
    """The model uses something the translation does not handle (the sink uses pydantic)."""


FLOAT_MAX = sys.float_info.max
_CHARSET = re.compile(r"\^\[([^\]\\\n]+)\]\+\$")
"""A pattern that is one character class repeated (ids): `^[A-Za-z0-9._-]+$`."""
_CONSTRAINTS = {at.Ge: "ge", at.Gt: "gt", at.Le: "le", at.Lt: "lt", at.MinLen: "min_length", at.MaxLen: "max_length"}


def _pattern(p: str) -> str:
    """pydantic's regex `$` is the absolute end; Python's also matches before a final newline."""
    if p.endswith("$") and not p.endswith("\\$"):
        p = p[:-1] + r"\Z"
    return p


def _meta(items: list[Any], charsets: list[str] | None) -> tuple[dict[str, Any], bool]:
    """msgspec.Meta keywords from pydantic/annotated-types metadata; and allow_inf_nan.

    A `^[class]+$` pattern is left out of the keywords and appended to `charsets` (when
    given): the struct checks all such fields at once (`_charset_check`), which is much
    cheaper than msgspec's one Python regex call per string.
    """
    kw: dict[str, Any] = {}
    allow_inf_nan = True
    for m in items:
        if isinstance(m, FieldInfo):
            sub, allow = _meta(list(m.metadata), charsets)
            kw.update(sub)
            allow_inf_nan = allow_inf_nan and allow
            continue
        name = _CONSTRAINTS.get(type(m))
        if name is not None:
            kw[name] = getattr(m, name)
            continue
        if type(m).__name__ == "_PydanticGeneralMetadata":
            extra = dict(vars(m))
            if "pattern" in extra:
                pattern = extra.pop("pattern")
                simple = _CHARSET.fullmatch(pattern)
                if simple and charsets is not None:
                    charsets.append(simple.group(1))
                else:
                    kw["pattern"] = _pattern(pattern)
            if "allow_inf_nan" in extra:
                allow_inf_nan = bool(extra.pop("allow_inf_nan"))
            if extra:
                raise Unsupported(f"constraint {extra}")
            continue
        if type(m).__name__ == "AllowInfNan":
            allow_inf_nan = bool(m.allow_inf_nan)
            continue
        raise Unsupported(f"metadata {m!r}")
    return kw, allow_inf_nan


def _float_bounds(kw: dict[str, Any]) -> dict[str, Any]:
    """Bounds that also reject inf and NaN (msgspec has no allow_inf_nan)."""
    kw = dict(kw)
    if "ge" not in kw and "gt" not in kw:
        kw["ge"] = -FLOAT_MAX
    if "le" not in kw and "lt" not in kw:
        kw["le"] = FLOAT_MAX
    return kw


def _convert(tp: Any, meta: list[Any], structs: dict[type, type], charsets: list[str] | None = None) -> Any:
    """The msgspec type for a pydantic annotation `tp` with `meta` constraints on it.

    `charsets` collects the simple patterns of a top-level field (a string, an optional
    string or a list of strings), which the struct then checks itself."""
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *more = get_args(tp)
        return _convert(inner, [*more, *meta], structs, charsets)
    kw, allow_inf_nan = _meta(meta, charsets)
    if origin in (Union, types.UnionType):
        if kw:
            raise Unsupported(f"constraints on a union {tp}")
        return Union[tuple(_convert(a, [], structs, charsets) for a in get_args(tp))]  # noqa: UP007
    if tp is type(None):
        out: Any = None
    elif tp in (str, int, bool):
        out = tp
    elif tp is float:
        out = float
        if not allow_inf_nan:
            kw = _float_bounds(kw)
    elif origin is Literal:
        out = tp
    elif origin is list:
        (item,) = get_args(tp)
        out = list[_convert(item, [], structs, charsets)]
    elif origin is dict:
        key, value = get_args(tp)
        out = dict[_convert(key, [], structs), _convert(value, [], structs)]
    elif isinstance(tp, type) and issubclass(tp, enum.StrEnum):
        out = Literal[tuple(m.value for m in tp)]
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        out = _struct(tp, structs)
    else:
        raise Unsupported(f"type {tp!r}")
    return Annotated[out, msgspec.Meta(**kw)] if kw else out


def _charset_check(charset: str, names: list[str]) -> Callable[[Any], None]:
    """Check every string of the fields `names` against `^[charset]+$` at once.

    The strings are joined with newlines and encoded; deleting the allowed bytes must
    leave exactly the separators. Much cheaper than a regex call per field; a class that
    admits any non-ASCII character is not translated (`Unsupported`).
    """
    pattern = re.compile(f"[{charset}]")
    if pattern.match("\n") or any(pattern.match(chr(c)) for c in (0xE9, 0x3B1, 0x4E00, 0x1F600)):
        raise Unsupported(f"character class [{charset}]")
    allowed = bytes(c for c in range(128) if pattern.match(chr(c)))
    get = operator.attrgetter(*names) if len(names) > 1 else (lambda self: (getattr(self, names[0]),))

    def check(self: Any) -> None:
        values = get(self)
        if None in values:  # an optional field left out (no exception: that path is slow)
            values = [v for v in values if v is not None]
        try:
            joined, count = "\n".join(values), len(values)
        except TypeError:  # a field is a list
            strings: list[str] = []
            for value in values:
                if value.__class__ is str:
                    strings.append(value)
                elif value is not None:
                    strings.extend(value)
            joined, count = "\n".join(strings), len(strings)
        if count and joined.encode().translate(None, allowed) != b"\n" * (count - 1):
            bad = next(n for n in names if _bad(pattern, getattr(self, n)))
            raise ValueError(f"{bad}: string does not match the pattern ^[{charset}]+$")

    return check


def _bad(pattern: re.Pattern[str], value: str | list[str] | None) -> bool:
    values = [] if value is None else [value] if isinstance(value, str) else value
    return any(not all(pattern.match(ch) for ch in v) for v in values)


def _with_plain_enums(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` seeing each StrEnum of its module as a namespace of plain strings.

    The struct holds enum fields as their string values, which compare equal to the
    members; but on Python 3.11 every `Kind.MEMBER` lookup runs a Python-level
    descriptor, which made the validators cost more than the whole msgspec decode. A
    validator that needs the enum class itself (isinstance, `.value`) fails here and
    the message goes to the reference decoder: slower, never wrong.
    """
    if not isinstance(func, types.FunctionType):
        return func
    plain = {
        name: types.SimpleNamespace(**{m.name: m.value for m in value})
        for name, value in func.__globals__.items()
        if isinstance(value, type) and issubclass(value, enum.StrEnum)
    }
    if not plain:
        return func
    scope = {**func.__globals__, **plain}
    return types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)


def _post_init(checks: list[Callable[[Any], Any]]) -> Callable[[Any], None]:
    def __post_init__(self: Any) -> None:
        for check in checks:
            check(self)

    return __post_init__


def _factory(factory: Callable[[], Any], structs: dict[type, type]) -> Callable[[], Any]:
    """A default factory; one that makes a pydantic model makes its struct instead."""
    sample = factory()  # type: ignore[call-arg]
    if isinstance(sample, BaseModel):
        struct = _struct(type(sample), structs)
        return lambda: msgspec.convert(sample.model_dump(), type=struct)
    return factory  # type: ignore[return-value]


def _properties(model: type[BaseModel]) -> dict[str, property]:
    """The model's own properties (`FeedbackEvent.is_terminal`), to read the same on the
    struct; they see enum members as plain strings, as the validators do."""
    out: dict[str, property] = {}
    for cls in reversed(model.__mro__):
        if cls is BaseModel or not issubclass(cls, BaseModel):
            continue
        for name, value in vars(cls).items():
            if isinstance(value, property) and value.fget is not None and value.fset is None:
                out[name] = property(_with_plain_enums(value.fget), doc=value.__doc__)
    return out


def _struct(model: type[BaseModel], structs: dict[type, type]) -> type:
    """The msgspec struct mirroring `model` (memoised in `structs`)."""
    if model in structs:
        return structs[model]
    cfg = model.model_config
    extra = cfg.get("extra", "ignore")
    if extra not in ("forbid", "ignore") or cfg.get("strict") is False or cfg.get("populate_by_name"):
        raise Unsupported(f"{model.__name__}: model_config {cfg}")
    decorators = model.__pydantic_decorators__
    if decorators.validators or decorators.field_validators or decorators.root_validators:
        raise Unsupported(f"{model.__name__}: field validators")
    checks = []
    for dec in decorators.model_validators.values():
        if dec.info.mode != "after":
            raise Unsupported(f"{model.__name__}: a {dec.info.mode} model validator")
        checks.append(_with_plain_enums(dec.func))
    hints = typing.get_type_hints(model, include_extras=True)
    fields = []
    by_charset: dict[str, list[str]] = {}
    for name, info in model.model_fields.items():
        if info.alias not in (None, name) or info.validation_alias is not None:
            raise Unsupported(f"{model.__name__}.{name}: alias")
        charsets: list[str] = []
        tp = _convert(hints[name], list(info.metadata), structs, charsets)
        if len(set(charsets)) > 1:
            tp = _convert(hints[name], list(info.metadata), structs)
        elif charsets:
            by_charset.setdefault(charsets[0], []).append(name)
        if info.default_factory is not None:
            default: Any = msgspec.field(default_factory=_factory(info.default_factory, structs))
        elif info.is_required():
            default = msgspec.NODEFAULT
        else:
            default = info.default.value if isinstance(info.default, enum.Enum) else info.default
            if isinstance(default, (dict, list)):
                value = default
                default = msgspec.field(default_factory=lambda v=value: type(v)(v))
        fields.append((name, tp) if default is msgspec.NODEFAULT else (name, tp, default))
    # Field checks first, then the model's validators, as pydantic orders them.
    checks = [*(_charset_check(c, names) for c, names in by_charset.items()), *checks]
    ns: dict[str, Any] = _properties(model)
    if checks:
        ns["__post_init__"] = _post_init(checks)
    struct = msgspec.defstruct(
        f"Fast{model.__name__}",
        fields,
        kw_only=True,
        forbid_unknown_fields=extra == "forbid",
        namespace=ns or None,
        gc=False,  # no cycles (strings, numbers, lists, dicts, structs): not GC-tracked
    )
    structs[model] = struct
    return struct


DecodeError = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, AttributeError, RecursionError)
"""What a fast decoder raises for input it does not accept (then ask pydantic).
AttributeError: a validator using something only the pydantic model has."""
FAST_ERRORS = DecodeError
"""Alias of `DecodeError` for callers that inline the fast path (the join's loop)."""


def struct_of(model: type[BaseModel]) -> type:
    """The msgspec struct mirroring `model`; raises `Unsupported` when the model uses
    something the translation does not know."""
    return _struct(model, _STRUCTS)


_STRUCTS: dict[type, type] = {}


def fast_decoder(model: type[ev.Event]) -> Callable[[bytes], Any] | None:
    """A function bytes -> struct mirroring `model` (same attribute names and values as
    the model, enums as their string values), raising one of `DecodeError` for anything
    it does not accept; None when the model cannot be translated."""
    try:
        decoder = msgspec.json.Decoder(struct_of(model))
    except (Unsupported, TypeError, ValueError):
        return None
    return decoder.decode


def _struct_or_none(model: type[BaseModel]) -> type | None:
    try:
        return struct_of(model)
    except (Unsupported, TypeError, ValueError):
        return None


class _RefuseAll:
    """The decoder of a model that cannot be translated: refuses everything, so that
    pydantic decides (slower, never wrong; test_schemas_fast.py fails on it)."""

    def decode(self, raw: bytes) -> Any:
        raise msgspec.DecodeError("no fast decoder for this model")


FastSamplingParams = _struct_or_none(ev.SamplingParams)
"""The struct of `schemas.events.SamplingParams`."""
FastGeneration = _struct_or_none(ev.GenerationEvent)
"""The struct of `schemas.events.GenerationEvent` (a sample's source)."""
FastFeedback = _struct_or_none(ev.FeedbackEvent)
"""The struct of `schemas.events.FeedbackEvent` (has `is_terminal`, as the model)."""


class JsonArray(collections.abc.Sequence):
    """A validated JSON array of numbers kept as its original bytes (a `msgspec.Raw` view
    into the message, no copy): `len` without decoding, the items decoded on demand (with
    the field's own decoder, so the same values and types as the list), and spliced
    unchanged when the event is re-encoded (`fragment()`). A list of numbers costs one
    heap object per item, allocated at decode time and read back, scattered, when the
    sample is encoded; this costs none."""

    __slots__ = ("_decode", "_len", "raw")

    def __init__(self, raw: msgspec.Raw, length: int, decode: Callable[[Any], list[Any]]) -> None:
        self.raw = raw
        self._len = length
        self._decode = decode

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: Any) -> Any:
        return self.items()[index]

    def __iter__(self) -> typing.Iterator[Any]:
        return iter(self.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JsonArray):
            other = other.items()
        return isinstance(other, list) and self.items() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"JsonArray({bytes(self.raw)!r})"

    def items(self) -> list[Any]:
        """The array as a list (decoded now)."""
        return self._decode(self.raw)

    def fragment(self) -> orjson.Fragment:
        """The original JSON text, for orjson to splice into an encoded event."""
        return orjson.Fragment(bytes(self.raw))


def _number_array(tp: Any) -> bool:
    """Whether a struct field type is a list of ints or floats (constraints allowed)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is not list:
        return False
    (item,) = get_args(tp)
    while get_origin(item) is Annotated:
        item = get_args(item)[0]
    return item in (int, float)


def _redeclared(f: Any, tp: Any) -> tuple[Any, ...]:
    """A msgspec struct field spec for `defstruct`: field `f` of a derived struct, typed `tp`
    (the same default or default factory)."""
    if f.required:
        return (f.name, tp)
    if f.default_factory is not msgspec.NODEFAULT:
        return (f.name, tp, msgspec.field(default_factory=f.default_factory))
    return (f.name, tp, f.default)


def _derived_struct(
    name: str,
    model: type[BaseModel],
    base: type,
    fields: list[tuple[Any, ...]],
    post_init: Callable[[Any], None] | None,
) -> type:
    """A struct like `base` (`struct_of(model)`) with retyped `fields`, the model's properties
    and `post_init` (not GC-tracked: no cycles)."""
    namespace = {**_properties(model), **({"__post_init__": post_init} if post_init is not None else {})}
    return msgspec.defstruct(
        name,
        fields,
        kw_only=True,
        forbid_unknown_fields=base.__struct_config__.forbid_unknown_fields,
        namespace=namespace,
        gc=False,
    )


def spliced_struct_of(model: type[BaseModel]) -> type:
    """`struct_of(model)` with every top-level array of numbers (token ids, logprobs)
    held as a `JsonArray` instead of a list.

    Same verdict as `struct_of(model)`: each array is read as `msgspec.Raw`, then decoded
    with the field's own type (bounds, length) in `__post_init__`; the field checks and
    the model's validators then run on the lists, exactly as in `struct_of`, and only
    then is each list replaced by a `JsonArray` of its bytes (the lists are freed at
    once). Raises `Unsupported` like `struct_of`.
    """
    if model in _SPLICED:
        return _SPLICED[model]
    base = struct_of(model)
    fields = []
    arrays: list[tuple[str, Callable[[Any], list[Any]]]] = []
    for f in msgspec.structs.fields(base):
        tp = f.type
        if _number_array(tp):
            arrays.append((f.name, msgspec.json.Decoder(tp).decode))
            tp = msgspec.Raw
        fields.append(_redeclared(f, tp))
    base_post_init = getattr(base, "__post_init__", None)

    def __post_init__(self: Any) -> None:
        raws = []
        for name, decode_array in arrays:
            value = getattr(self, name)
            if value.__class__ is msgspec.Raw:  # else a default, already checked
                items = decode_array(value)
                setattr(self, name, items)
                raws.append((name, value, len(items), decode_array))
        if base_post_init is not None:
            base_post_init(self)
        for name, raw, length, decode_array in raws:
            setattr(self, name, JsonArray(raw, length, decode_array))

    struct = _derived_struct(f"Spliced{model.__name__}", model, base, fields, __post_init__)
    _SPLICED[model] = struct
    return struct


_SPLICED: dict[type, type] = {}


_DIGIT_TO_D = bytes.maketrans(b"0123456789", b"dddddddddd")
COUNTED_MAX_DIGITS = 9
"""The longest item (in digits) the byte check of a counted array accepts: every integer of
up to 9 digits lies in [0, 10**9), within the bounds a counted field must admit."""


def _counted_field(tp: Any) -> tuple[int, int] | None:
    """(min_length, max_length) when `tp` is a list of ints whose bounds admit every
    integer in [0, 10**9) (token ids); None otherwise."""
    outer: list[Any] = []
    while get_origin(tp) is Annotated:
        tp, *more = get_args(tp)
        outer.extend(more)
    if get_origin(tp) is not list:
        return None
    (item,) = get_args(tp)
    inner: list[Any] = []
    while get_origin(item) is Annotated:
        item, *more = get_args(item)
        inner.extend(more)
    if item is not int:
        return None
    for meta in inner:
        lo = meta.ge if meta.ge is not None else None if meta.gt is None else meta.gt + 1
        hi = meta.le if meta.le is not None else None if meta.lt is None else meta.lt - 1
        if (lo is not None and lo > 0) or (hi is not None and hi < 10**COUNTED_MAX_DIGITS - 1):
            return None
        if meta.pattern is not None or meta.multiple_of is not None:
            return None
    min_len, max_len = 0, sys.maxsize
    for meta in outer:
        min_len = max(min_len, meta.min_length or 0)
        max_len = min(max_len, sys.maxsize if meta.max_length is None else meta.max_length)
    return min_len, max_len


class CountedArray(msgspec.Struct, frozen=True, gc=False):
    """A JSON array of integers checked on its bytes (`counted_struct_of`): `len` is its
    number of items, iteration decodes them."""

    raw: msgspec.Raw
    count: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> typing.Iterator[int]:
        return iter(msgspec.json.decode(self.raw, type=list[int]))


def _count_checks(fields: list[tuple[str, int, int]]) -> Callable[[Any], None]:
    """Check the raw JSON of each integer array in `fields` (name, min_length, max_length)
    on its bytes and hold it as a `CountedArray`: only non-negative integers of at most
    `COUNTED_MAX_DIGITS` digits, comma separated, no whitespace (msgspec has already
    checked that it is valid JSON), within the length bounds. Anything else raises
    ValueError: the caller's slower, exact path decides."""
    too_long = b"d" * (COUNTED_MAX_DIGITS + 1)

    def check(self: Any) -> None:
        for name, min_len, max_len in fields:
            value = getattr(self, name)
            if value.__class__ is not msgspec.Raw:  # the field's default: already a list
                continue
            raw = bytes(value)
            shape = raw.translate(_DIGIT_TO_D)
            if shape.translate(None, b"d,") != b"[]" or too_long in shape:
                raise ValueError(f"{name}: not an array of small non-negative integers (the exact path decides)")
            count = shape.count(b",") + 1 if len(raw) > 2 else 0
            if not min_len <= count <= max_len:
                raise ValueError(f"{name}: {count} items, outside [{min_len}, {max_len}]")
            setattr(self, name, CountedArray(value, count))

    return check


def _strings_check(charset: str, names: list[str], list_names: list[str]) -> Callable[[Any], None]:
    """`_charset_check` for the string fields `names` and the lists of strings
    `list_names`, without an exception on the lists (`counted_struct_of`)."""
    slow = _charset_check(charset, [*names, *list_names])
    pattern = re.compile(f"[{charset}]")
    allowed = bytes(c for c in range(128) if pattern.match(chr(c)))
    get = operator.attrgetter(*names) if len(names) > 1 else (lambda self: (getattr(self, names[0]),))
    get_lists = [operator.attrgetter(n) for n in list_names]

    def check(self: Any) -> None:
        values = get(self) if names else ()
        if None in values:
            values = [v for v in values if v is not None]
        if get_lists:
            values = list(values)
            for get_list in get_lists:
                items = get_list(self)
                if items is not None:
                    values.extend(items)
        count = len(values)
        if count and len("\n".join(values).encode().translate(None, allowed)) != count - 1:
            slow(self)  # raises, naming the field
            raise ValueError(f"string does not match the pattern ^[{charset}]+$")

    return check


def _string_list(tp: Any) -> bool:
    """Whether a field holding checked strings is a list of them (else one string or None)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is list:
        return True
    if get_origin(tp) in (Union, types.UnionType) and any(_string_list(a) for a in get_args(tp)):
        raise Unsupported(f"a union with a list {tp!r}")
    return False


def _string_groups(model: type[BaseModel]) -> dict[str, tuple[list[str], list[str]]]:
    """The fields whose strings `struct_of` checks against a `^[class]+$` pattern, per
    class: (string fields, lists of strings)."""
    hints = typing.get_type_hints(model, include_extras=True)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for name, info in model.model_fields.items():
        charsets: list[str] = []
        _convert(hints[name], list(info.metadata), {}, charsets)
        if len(set(charsets)) == 1:
            scalars, lists = groups.setdefault(charsets[0], ([], []))
            (lists if _string_list(hints[name]) else scalars).append(name)
    return groups


def counted_struct_of(model: type[BaseModel], strings: bool = True) -> type:
    """`struct_of(model)` for a reader that needs only how many items each top-level array
    of integers holds (the sink stores token counts, not token ids).

    Such an array (a list of ints whose bounds admit [0, 10**9), e.g. token ids) is read
    as `msgspec.Raw` and checked on its bytes (`_count_checks`), never decoded item by
    item, then held as a `CountedArray` (`len` free, items decoded on demand). The check
    accepts only what the field's type accepts; it refuses some valid input (whitespace
    in the array, an id of 10 digits), which its caller sends to the exact path, as it
    does any `DecodeError`. The string patterns are checked as in `struct_of`, lists of
    ids without an exception; then the model's validators run, which see the
    `CountedArray`s (their `len` is the list's). Raises `Unsupported` like `struct_of`.

    `strings=False` leaves the string patterns out: only for `counted_batch_decoder`,
    which checks them for a whole batch at once.
    """
    key = (model, strings)
    if key in _COUNTED:
        return _COUNTED[key]
    base = struct_of(model)
    counted: list[tuple[str, int, int]] = []
    fields = []
    for f in msgspec.structs.fields(base):
        tp = f.type
        bounds = _counted_field(tp)
        if bounds is not None:
            counted.append((f.name, *bounds))
            tp = msgspec.Raw
        fields.append(_redeclared(f, tp))
    groups = _string_groups(model)
    checks = [_count_checks(counted)] if counted else []
    if strings:
        checks += [_strings_check(c, scalars, lists) for c, (scalars, lists) in groups.items()]
    checks += [_with_plain_enums(d.func) for d in model.__pydantic_decorators__.model_validators.values()]
    struct = _derived_struct(f"Counted{model.__name__}", model, base, fields, _post_init(checks) if checks else None)
    _COUNTED[key] = struct
    return struct


_COUNTED: dict[tuple[type, bool], type] = {}


def counted_decoder(model: type[ev.Event]) -> Callable[[bytes], Any] | None:
    """As `fast_decoder`, with `counted_struct_of(model)`: arrays of integers are counted,
    not decoded. None when the model cannot be translated."""
    try:
        decoder = msgspec.json.Decoder(counted_struct_of(model))
    except (Unsupported, TypeError, ValueError):
        return None
    return decoder.decode


def counted_batch_decoder(model: type[ev.Event]) -> Callable[[list[bytes]], list[Any]] | None:
    """`counted_decoder` for a batch of messages (the sink): values -> one struct per
    value, or None where the fast path refuses it (then ask the exact path).

    The same verdicts as `counted_decoder`, value by value, but the string patterns (ids)
    are checked once for the whole batch: every id of every message joined and checked
    in one pass, instead of a few Python calls per message; only a batch that fails is
    checked message by message to find which. None when the model cannot be translated.
    Built once per model (memoised).
    """
    if model in _BATCH_DECODERS:
        return _BATCH_DECODERS[model]
    _BATCH_DECODERS[model] = decoder = _counted_batch_decoder(model)
    return decoder


_BATCH_DECODERS: dict[type, Callable[[list[bytes]], list[Any]] | None] = {}


def _counted_batch_decoder(model: type[ev.Event]) -> Callable[[list[bytes]], list[Any]] | None:
    try:
        decode = msgspec.json.Decoder(counted_struct_of(model, strings=False)).decode
        groups = _string_groups(model)
        per_struct = [_strings_check(c, scalars, lists) for c, (scalars, lists) in groups.items()]
    except (Unsupported, TypeError, ValueError):
        return None
    checks = []
    for (charset, (scalars, lists)), one in zip(groups.items(), per_struct, strict=True):
        pattern = re.compile(f"[{charset}]")
        allowed = bytes(c for c in range(128) if pattern.match(chr(c)))
        checks.append(
            (allowed, [operator.attrgetter(n) for n in scalars], [operator.attrgetter(n) for n in lists], one)
        )

    def refused(check: Callable[[Any], None], struct: Any) -> bool:
        try:
            check(struct)
        except ValueError:
            return True
        return False

    def decode_one(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError:
            return None

    def decode_batch(values: list[bytes]) -> list[Any]:
        try:
            out = [decode(raw) for raw in values]
        except DecodeError:
            out = [decode_one(raw) for raw in values]
        for allowed, scalar_gets, list_gets, one in checks:
            good = [s for s in out if s is not None] if None in out else out
            strings: list[str] = []
            for get in scalar_gets:
                strings += map(get, good)
            if None in strings:  # optional fields left out
                strings = [s for s in strings if s is not None]
            for get in list_gets:
                for items in map(get, good):
                    if items is not None:
                        strings += items
            count = len(strings)
            try:
                ok = not count or len("\n".join(strings).encode().translate(None, allowed)) == count - 1
            except ValueError:  # e.g. a lone surrogate (msgspec refuses them already)
                ok = False
            if not ok:
                out = [None if s is None or refused(one, s) else s for s in out]
        return out

    return decode_batch


Generation = Any
"""A decoded generation: a `FastGeneration`, or the `GenerationEvent` for input only
pydantic's lax mode accepts (same attributes)."""
Feedback = Any
"""A decoded feedback event: a `FastFeedback`, or the `FeedbackEvent` (same attributes)."""

GENERATION_DECODER: Any = msgspec.json.Decoder(FastGeneration) if FastGeneration is not None else _RefuseAll()
"""The strict fast path for callers that inline it (the join's loop): `.decode(raw)`
raises one of `FAST_ERRORS` where `decode_generation` would ask pydantic."""
FEEDBACK_DECODER: Any = msgspec.json.Decoder(FastFeedback) if FastFeedback is not None else _RefuseAll()
"""As `GENERATION_DECODER`, for feedback."""


def _spliced_or_none(model: type[BaseModel]) -> type | None:
    try:
        return spliced_struct_of(model)
    except (Unsupported, TypeError, ValueError):
        return None


SplicedGeneration = _spliced_or_none(ev.GenerationEvent)
"""`FastGeneration` with token ids and logprobs as `JsonArray` (the join's generations)."""
GENERATION_SPLICE_DECODER: Any = (
    msgspec.json.Decoder(SplicedGeneration) if SplicedGeneration is not None else _RefuseAll()
)
"""As `GENERATION_DECODER` (the same verdict), with the arrays kept as their bytes: the
join copies them into the sample without building a Python object per token."""


def fast_generation(raw: bytes) -> Any | None:
    """The strict fast path alone: the struct, or None when it refuses the input."""
    try:
        return GENERATION_DECODER.decode(raw)
    except DecodeError:
        return None


def fast_feedback(raw: bytes) -> Any | None:
    """The strict fast path alone: the struct, or None when it refuses the input."""
    try:
        return FEEDBACK_DECODER.decode(raw)
    except DecodeError:
        return None


def _fast_or_verdict(decoder: Any, model: type[ev.Event], raw: bytes) -> Any:
    """The struct when the fast path accepts `raw`, else pydantic's verdict on it."""
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            return decoder.decode(raw)
        except DecodeError:
            pass
    return pydantic_verdict(model, raw)


def decode_generation(raw: bytes) -> Generation:
    """Decode and validate a generations.v1 value exactly as `decode(GenerationEvent, raw)`
    does (same verdict, same `InvalidEvent`), fast for the valid case."""
    return _fast_or_verdict(GENERATION_DECODER, ev.GenerationEvent, raw)


def decode_feedback(raw: bytes) -> Feedback:
    """Decode and validate a feedback.v1 value exactly as `decode(FeedbackEvent, raw)`
    does (same verdict, same `InvalidEvent`), fast for the valid case."""
    return _fast_or_verdict(FEEDBACK_DECODER, ev.FeedbackEvent, raw)


def pydantic_verdict(model: type[ev.Event], raw: bytes) -> Any:
    """The verdict of the contract on what the fast path refused (raises `InvalidEvent`
    naming the field)."""
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            # pydantic's JSON mode accepts a few inputs its Python mode refuses, and the
            # other way round; the join has always accepted either.
            return model.model_validate_json(raw)
        except Exception:  # decode() below gives the verdict and names the field
            pass
    return decode(model, raw)


__all__ = [
    "FAST_ERRORS",
    "FEEDBACK_DECODER",
    "GENERATION_DECODER",
    "GENERATION_SPLICE_DECODER",
    "CountedArray",
    "DecodeError",
    "FastFeedback",
    "FastGeneration",
    "FastSamplingParams",
    "Feedback",
    "Generation",
    "InvalidEvent",
    "JsonArray",
    "SplicedGeneration",
    "Unsupported",
    "counted_batch_decoder",
    "counted_decoder",
    "counted_struct_of",
    "decode_feedback",
    "decode_generation",
    "fast_decoder",
    "fast_feedback",
    "fast_generation",
    "pydantic_verdict",
    "spliced_struct_of",
    "struct_of",
]
