"""Bad arguments raise at call time with a clear message (issue 2, point 6)."""

import asyncio
import gc
import math
import os
import socket
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncio_bridge as ab


class Fileno:
    def __init__(self, value):
        self.value = value

    def fileno(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


TYPE_ERRORS = [
    ("sleep('1')", lambda: ab.sleep("1")),
    ("sleep(None)", lambda: ab.sleep(None)),
    ("sleep(b'1')", lambda: ab.sleep(b"1")),
    ("sleep([])", lambda: ab.sleep([])),
    ("sleep()", lambda: ab.sleep()),
    ("sleep(1, 2, 3)", lambda: ab.sleep(1, 2, 3)),
    ("sleep(1, bogus=1)", lambda: ab.sleep(1, bogus=1)),
    ("nop(1, 2)", lambda: ab.nop(1, 2)),
    ("wait_readable('3')", lambda: ab.wait_readable("3")),
    ("wait_readable(3.0)", lambda: ab.wait_readable(3.0)),
    ("wait_readable(None)", lambda: ab.wait_readable(None)),
    ("wait_readable(object())", lambda: ab.wait_readable(object())),
    ("wait_readable(fileno->str)", lambda: ab.wait_readable(Fileno("x"))),
    ("wait_readable(fileno->None)", lambda: ab.wait_readable(Fileno(None))),
    ("wait_readable()", lambda: ab.wait_readable()),
    ("wait_readable(0, timeout='1')", lambda: ab.wait_readable(0, timeout="1")),
    ("wait_writable('3')", lambda: ab.wait_writable("3")),
    ("wait_writable(0, timeout=[])", lambda: ab.wait_writable(0, timeout=[])),
    ("wait_writable(0, bogus=1)", lambda: ab.wait_writable(0, bogus=1)),
]

VALUE_ERRORS = [
    ("sleep(nan)", lambda: ab.sleep(math.nan), "(?i)nan"),
    ("sleep(-nan)", lambda: ab.sleep(-math.nan), "(?i)nan"),
    ("wait_readable(0, timeout=nan)", lambda: ab.wait_readable(0, timeout=math.nan), "(?i)nan"),
    ("wait_writable(0, timeout=nan)", lambda: ab.wait_writable(0, timeout=math.nan), "(?i)nan"),
    ("wait_readable(-1)", lambda: ab.wait_readable(-1), r"(?i)negative|-1|>= ?0"),
    ("wait_writable(-5)", lambda: ab.wait_writable(-5), r"(?i)negative|-5|>= ?0"),
    ("wait_readable(fileno->-1)", lambda: ab.wait_readable(Fileno(-1)), r"(?i)negative|-1|>= ?0"),
]


@pytest.fixture
def no_side_effects():
    """The call created no op: nothing submitted, nothing to warn about."""
    before = ab.stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert ab.stats()["submitted"] == before["submitted"]
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("call", [c for _, c in TYPE_ERRORS], ids=[i for i, _ in TYPE_ERRORS])
def test_wrong_types_raise_type_error(call, no_side_effects):
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value)


@pytest.mark.parametrize(
    "call, message", [(c, m) for _, c, m in VALUE_ERRORS], ids=[i for i, _, _ in VALUE_ERRORS]
)
def test_bad_values_raise_value_error(call, message, no_side_effects):
    with pytest.raises(ValueError, match=message):
        call()


def test_closed_socket_object_is_a_value_error(no_side_effects):
    a, b = socket.socketpair()
    a.close()
    b.close()
    with pytest.raises(ValueError):
        ab.wait_readable(a)


def test_closed_file_object_raises_from_fileno(no_side_effects):
    r, w = os.pipe()
    os.close(w)
    f = open(r, "rb")
    f.close()
    with pytest.raises(ValueError):
        ab.wait_readable(f)


def test_fileno_exception_propagates(no_side_effects):
    with pytest.raises(ZeroDivisionError):
        ab.wait_readable(Fileno(ZeroDivisionError("from fileno")))


def test_configure_rejects_unknown_delivery():
    before = ab.configure()
    with pytest.raises(ValueError, match="(?i)bogus|delivery"):
        ab.configure(delivery="bogus")
    with pytest.raises((TypeError, ValueError)):
        ab.configure(delivery=1)
    with pytest.raises(TypeError):
        ab.configure("add_reader")
    with pytest.raises(TypeError):
        ab.configure(bogus=1)
    assert ab.configure() == before


@pytest.mark.asyncio
async def test_huge_fd_raises_cleanly():
    """Whatever the input, no crash: an fd no process can have."""
    with pytest.raises((OverflowError, ValueError, OSError)):
        await asyncio.wait_for(ab.wait_readable(2**31 - 1), 5)
    with pytest.raises((OverflowError, ValueError)):
        ab.wait_readable(2**70)


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.builds(object),
    st.builds(Fileno, st.integers(min_value=-(2**40), max_value=2**40)),
)
ACCEPTABLE = (TypeError, ValueError, OverflowError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delay=ANY_VALUE, timeout=st.one_of(st.none(), ANY_VALUE))
def test_arbitrary_arguments_never_crash(delay, timeout):
    for make in (
        lambda: ab.sleep(delay, timeout),
        lambda: ab.nop(delay),
        lambda: ab.wait_readable(delay, timeout=timeout),
        lambda: ab.wait_writable(delay, timeout=timeout),
    ):
        try:
            op = make()
        except ACCEPTABLE:
            continue
        assert type(op) is ab.Op
        op.close()
