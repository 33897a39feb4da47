"""`@record`: a drop-in for `@dataclass` that builds its methods without compiling code.

`dataclasses` writes __init__/__repr__/__eq__/__hash__ (and __setattr__/__delattr__ when
frozen) as source text and `exec`s it for every class when its module is imported: ~1 ms per
class on the kvm-pvm hosts, ~50 ms of a VMM start that defines ~50 value classes. A record
gets generic methods instead: one closure per class, no compilation. Instances cost a few µs
more to create, which is fine for what records hold (configuration, events, state records),
not for per-exit or per-descriptor objects.

Records are dataclasses to the rest of the world: `dataclasses.fields`, `replace`, `asdict`
and `is_dataclass` work, because the class carries the same `__dataclass_fields__` table
(of real `dataclasses.Field` objects) and `__dataclass_params__` that `@dataclass` leaves.
Supported: `frozen`, defaults, `field(default=, default_factory=, compare=, repr=)`,
inheritance from other records, `__post_init__`. Not supported (refused): ClassVar/InitVar
annotations, `order`, `kw_only` — use `@dataclass` for those.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, Field, FrozenInstanceError, field
from operator import attrgetter

__all__ = ["record", "field"]

_FIELDS = "__dataclass_fields__"
_PARAMS = "__dataclass_params__"


def record(cls=None, /, *, frozen: bool = False):
    def wrap(c):
        return _process(c, frozen)

    return wrap if cls is None else wrap(cls)


def _own_fields(cls) -> list[Field]:
    out = []
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        if "ClassVar" in text or "InitVar" in text or "KW_ONLY" in text:
            raise TypeError(f"@record {cls.__qualname__}.{name}: {text} is not supported, use @dataclass")
        default = cls.__dict__.get(name, MISSING)
        f = default if isinstance(default, Field) else field(default=default)
        if f.default is not MISSING and f.default.__class__.__hash__ is None:
            raise ValueError(f"mutable default {type(f.default)} for field {name} is not allowed: "
                             "use default_factory")
        f.name, f.type = name, annotation
        f._field_type = dataclasses._FIELD  # what dataclasses.fields() filters on
        f.kw_only = False  # field() leaves MISSING, which a @dataclass subclass reads as true
        out.append(f)
        # As @dataclass does: the class attribute is the plain default, or nothing.
        if f.default is MISSING:
            if name in cls.__dict__:
                delattr(cls, name)
        else:
            setattr(cls, name, f.default)
    return out


def _process(cls, frozen: bool):
    table: dict[str, Field] = {}
    for base in cls.__mro__[-1:0:-1]:
        base_fields = getattr(base, _FIELDS, None)
        if base_fields is not None:
            if getattr(base, _PARAMS).frozen != frozen:
                raise TypeError(f"{cls.__qualname__}: cannot mix frozen and non-frozen records")
            table.update(base_fields)
    for f in _own_fields(cls):
        table[f.name] = f
    fields = tuple(table.values())
    seen_default = False
    for f in fields:
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        if seen_default and not has_default:
            raise TypeError(f"non-default argument '{f.name}' follows default argument")
        seen_default = seen_default or has_default

    setattr(cls, _FIELDS, table)
    setattr(cls, _PARAMS, dataclasses._DataclassParams(True, True, True, False, False, frozen))
    names = tuple(f.name for f in fields)
    own = cls.__dict__
    if "__init__" not in own:
        cls.__init__ = _make_init(cls, fields, frozen)
    if "__repr__" not in own:
        cls.__repr__ = _make_repr(tuple(f.name for f in fields if f.repr))
    compared = tuple(f.name for f in fields if f.compare)
    if "__eq__" not in own:
        cls.__eq__ = _make_eq(compared)
    if "__hash__" not in own:
        # @dataclass's rule for eq=True: frozen -> hash of the compared fields, else unhashable.
        cls.__hash__ = _make_hash(compared) if frozen else None
    if frozen:
        cls.__setattr__, cls.__delattr__ = _frozen_methods(cls, frozenset(names))
    cls.__match_args__ = names
    return cls


def _make_init(cls, fields: tuple[Field, ...], frozen: bool):
    names = tuple(f.name for f in fields)
    index = frozenset(names)
    defaults = {f.name: f.default for f in fields if f.default is not MISSING}
    factories = {f.name: f.default_factory for f in fields if f.default_factory is not MISSING}
    post_init = getattr(cls, "__post_init__", None) is not None
    qualname = cls.__qualname__
    count = len(names)
    store = object.__setattr__ if frozen else None

    def __init__(self, *args, **kwargs):
        if not kwargs and len(args) == count:  # all given positionally: the common fast case
            if store is None:
                self.__dict__.update(zip(names, args))
            else:
                for name, value in zip(names, args):
                    store(self, name, value)
            if post_init:
                self.__post_init__()
            return
        if len(args) > count:
            raise TypeError(f"{qualname}.__init__() takes {count + 1} positional arguments "
                            f"but {len(args) + 1} were given")
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in index:
                raise TypeError(f"{qualname}.__init__() got an unexpected keyword argument '{key}'")
            if key in values:
                raise TypeError(f"{qualname}.__init__() got multiple values for argument '{key}'")
            values[key] = value
        for name in names:
            if name in values:
                value = values[name]
            elif name in defaults:
                value = defaults[name]
            elif name in factories:
                value = factories[name]()
            else:
                raise TypeError(f"{qualname}.__init__() missing required argument: '{name}'")
            if store is None:
                self.__dict__[name] = value
            else:
                store(self, name, value)
        if post_init:
            self.__post_init__()

    __init__.__qualname__ = f"{qualname}.__init__"
    return __init__


def _make_repr(names: tuple[str, ...]):
    def __repr__(self):
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__qualname__}({inner})"

    return __repr__


def _values(names: tuple[str, ...]):
    """obj -> the tuple of those fields, compared and hashed the way @dataclass does."""
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return attrgetter(*names) if names else (lambda obj: ())


def _make_eq(names: tuple[str, ...]):
    values = _values(names)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return values(self) == values(other)

    return __eq__


def _make_hash(names: tuple[str, ...]):
    values = _values(names)

    def __hash__(self):
        return hash(values(self))

    return __hash__


def _frozen_methods(cls, names: frozenset[str]):
    def __setattr__(self, name, value):
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot assign to field '{name}'")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self, name):
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot delete field '{name}'")
        super(cls, self).__delattr__(name)

    return __setattr__, __delattr__
