"""Connection names: the contract's pattern, exactly."""

from __future__ import annotations

import pytest

from proxy.names import check_name, is_valid_name


@pytest.mark.parametrize("name", ["a", "acme", "0", "acme-1.eu_x", "a" * 63, "default"])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "Acme", "-a", ".a", "_a", "a" * 64, "a/b", "a b", "a:b", "é", "a\n"]
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(ValueError, match="connection name"):
        check_name(name)


def test_a_long_or_odd_name_is_not_echoed() -> None:
    with pytest.raises(ValueError, match="invalid connection name") as info:
        check_name("x" * 500)
    assert "x" * 100 not in str(info.value)
    with pytest.raises(ValueError, match="must be a string"):
        check_name(3)
