"""domain.record behaves as @dataclass does for what pystrato uses (so `dataclasses.fields`,
`replace`, `asdict` keep working), and refuses what it does not support."""

import dataclasses

import pytest

from domain.record import field, record


def _pair(frozen):
    """The same class as a dataclass and as a record."""
    made = []
    for deco in (dataclasses.dataclass(frozen=frozen), record(frozen=frozen)):
        @deco
        class Point:
            x: int
            y: int = 0
            tags: tuple = ()
            notes: list = field(default_factory=list, compare=False)
            secret: str = field(default="", repr=False)
        made.append(Point)
    return made


@pytest.mark.parametrize("frozen", [True, False])
def test_same_behaviour_as_dataclass(frozen):
    dc, rc = _pair(frozen)
    for args, kwargs in [((1,), {}), ((1, 2), {"tags": (3,)}), ((), {"x": 5, "notes": [1]}),
                         ((1, 2, (), [], "s"), {})]:
        a, b = dc(*args, **kwargs), rc(*args, **kwargs)
        assert repr(a) == repr(b)
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
        assert [f.name for f in dataclasses.fields(a)] == [f.name for f in dataclasses.fields(b)]
        assert dataclasses.replace(b, y=9) == rc(b.x, 9, b.tags, b.notes, b.secret)
        assert dataclasses.is_dataclass(b)
    assert rc(1, notes=[1]) == rc(1, notes=[2])  # compare=False
    assert rc(1) != rc(2) and rc(1) != dc(1)
    assert rc(1).notes is not rc(1).notes  # a fresh default per instance
    assert "x" not in rc.__dict__  # no class attribute for a required field
    assert rc.y == 0
    if frozen:
        assert hash(rc(1, 2)) == hash(rc(1, 2))
        with pytest.raises(dataclasses.FrozenInstanceError):
            rc(1).x = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            del rc(1).x
    else:
        assert rc.__hash__ is None and dc.__hash__ is None
        p = rc(1)
        p.x = 3
        assert p.x == 3


@pytest.mark.parametrize("call", [
    lambda c: c(),                      # missing required
    lambda c: c(1, 2, (), [], "s", 6),  # too many positionals
    lambda c: c(1, z=2),                # unknown keyword
    lambda c: c(1, x=2),                # twice
])
def test_bad_calls_raise_type_error_like_dataclass(call):
    dc, rc = _pair(True)
    with pytest.raises(TypeError):
        call(dc)
    with pytest.raises(TypeError):
        call(rc)


def test_inheritance_post_init_and_explicit_methods():
    @record(frozen=True)
    class Base:
        kind: str

    @record(frozen=True)
    class Child(Base):
        n: int = 1

        def __post_init__(self):
            if self.n < 0:
                raise ValueError("negative")

    c = Child("k", 2)
    assert (c.kind, c.n) == ("k", 2) and isinstance(c, Base)
    assert [f.name for f in dataclasses.fields(Child)] == ["kind", "n"]
    with pytest.raises(ValueError):
        Child("k", -1)

    @record
    class Custom:
        a: int

        def __eq__(self, other):
            return True

        __hash__ = object.__hash__

    assert Custom(1) == Custom(2) and hash(Custom(1)) is not None

    # A real dataclass may subclass a record (dataclasses reads the params record leaves).
    @dataclasses.dataclass(frozen=True)
    class Sub(Child):
        extra: int = 0

    assert Sub("k", 1, 5).extra == 5


def test_unsupported_forms_are_refused():
    with pytest.raises(ValueError, match="mutable default"):
        @record
        class Bad:
            items: list = []  # noqa: RUF012

    with pytest.raises(TypeError, match="non-default argument"):
        @record
        class Order:
            a: int = 0
            b: int

    with pytest.raises(TypeError, match="not supported"):
        @record
        class Cv:
            a: "ClassVar[int]" = 0  # noqa: F821 (only the annotation text matters)

    with pytest.raises(TypeError, match="frozen"):
        @record(frozen=True)
        class F:
            a: int = 0

        @record
        class G(F):
            b: int = 0
