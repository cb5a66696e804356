"""Scheme and QuantConfig validation, and which module names the skip patterns catch."""

from __future__ import annotations

import dataclasses

import pytest

from qcompile.config import QuantConfig, Scheme


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_scheme_rejects_bits(bits: int) -> None:
    with pytest.raises(
        ValueError, match=rf"Scheme w4a16: bits={bits} is not supported; use bits=4"
    ):
        Scheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, 16, 48, 96, 256])
def test_scheme_rejects_group_size(group_size: int) -> None:
    with pytest.raises(ValueError) as info:
        Scheme(group_size=group_size)
    message = str(info.value)
    assert f"group_size={group_size} is not supported" in message
    assert "(32, 64, 128)" in message
    assert "None (per-channel)" in message


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_scheme_accepts_group_size(group_size: int | None) -> None:
    scheme = Scheme(group_size=group_size)
    assert scheme.group_size == group_size
    assert scheme.group_size_for(4096) == (4096 if group_size is None else group_size)


def test_scheme_defaults_and_frozen() -> None:
    scheme = Scheme()
    assert (scheme.name, scheme.bits, scheme.group_size, scheme.symmetric) == (
        "w4a16",
        4,
        128,
        False,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.group_size = 64  # type: ignore[misc]
    assert Scheme(group_size=64, symmetric=True) == Scheme(group_size=64, symmetric=True)
    assert hash(Scheme(group_size=64)) == hash(Scheme(group_size=64))


@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        ("lm_head", True),
        ("model.lm_head", True),
        ("transformer.decoder.lm_head", True),
        ("model.layers.0.mlp", False),
        ("model.layers.0.mlp.down_proj", False),
        ("model.lm_head_extra", False),
        ("lm_head.weight", False),
        ("my_lm_head", False),
    ],
)
def test_default_skip_patterns(name: str, skipped: bool) -> None:
    assert QuantConfig().skips(name) is skipped


def test_skip_as_single_string() -> None:
    config = QuantConfig(skip="*.mlp.*")
    assert config.skip == ("*.mlp.*",)
    assert config.skips("model.layers.0.mlp.down_proj")
    assert not config.skips("model.layers.0.self_attn.q_proj")
    # Replacing the defaults means lm_head is quantized now.
    assert not config.skips("model.lm_head")


def test_skip_patterns_are_case_sensitive_and_multiple() -> None:
    config = QuantConfig(skip=("*.q_proj", "model.layers.1.*"))
    assert config.skips("model.layers.0.self_attn.q_proj")
    assert config.skips("model.layers.1.mlp.up_proj")
    assert not config.skips("model.layers.0.self_attn.Q_PROJ")
    assert not config.skips("model.layers.0.mlp.up_proj")


def test_empty_skip_skips_nothing() -> None:
    assert not QuantConfig(skip=()).skips("lm_head")


@pytest.mark.parametrize("value", ["fallback", "raise"])
def test_on_unsupported_valid(value: str) -> None:
    assert QuantConfig(on_unsupported=value).on_unsupported == value  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["ignore", "Raise", "", "error"])
def test_on_unsupported_invalid(value: str) -> None:
    with pytest.raises(ValueError) as info:
        QuantConfig(on_unsupported=value)  # type: ignore[arg-type]
    assert str(info.value) == (f"QuantConfig: on_unsupported={value!r}; use 'fallback' or 'raise'")


def test_quant_config_carries_one_scheme() -> None:
    scheme = Scheme(group_size=32, symmetric=True)
    config = QuantConfig(scheme=scheme)
    assert config.scheme is scheme
    assert QuantConfig().scheme == Scheme()
    assert hash(QuantConfig()) == hash(QuantConfig())


def test_w4a8_scheme_defaults_to_int8_activations() -> None:
    scheme = Scheme(name="w4a8")
    assert (scheme.name, scheme.act_dtype, scheme.group_size) == ("w4a8", "int8", 128)
    assert Scheme(name="w4a8") == Scheme(name="w4a8", act_dtype="int8")
    fp8 = Scheme(name="w4a8", group_size=None, act_dtype="float8_e4m3fn")
    assert fp8.act_dtype == "float8_e4m3fn" and fp8.group_size_for(576) == 576
    assert Scheme().act_dtype is None  # W4A16 keeps the model's activations


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "w4a8", "act_dtype": "int4"},
            "Scheme w4a8: act_dtype='int4' is not supported; use one of ('int8', 'float8_e4m3fn')",
        ),
        (
            {"name": "w4a8", "symmetric": True},
            "Scheme w4a8: symmetric=True is not supported (QoQ's second level is asymmetric "
            "uint4 with integer zero points); use symmetric=False",
        ),
        (
            {"act_dtype": "int8"},
            "Scheme w4a16: act_dtype='int8' is not supported (W4A16 keeps the model's "
            "activations); use Scheme(name='w4a8', act_dtype=...) for 8-bit activations",
        ),
        ({"name": "w8a8"}, "Scheme: name='w8a8' is not supported; use one of ('w4a16', 'w4a8')"),
        ({"name": "w4a8", "group_size": 256}, "Scheme w4a8: group_size=256 is not supported"),
    ],
)
def test_scheme_rejects_bad_w4a8_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Scheme(**kwargs)
    assert str(info.value).startswith(message)
