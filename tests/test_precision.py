"""A 16-bit precision on a CPU that multiplies 16-bit matrices only in torch's reference kernel
(no AVX-512: ~150x slower than float32) is warned about, naming the key and the fix, by every
stage that would multiply in it: train, pretrain, and the LM's forward passes."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PRETRAIN

import framework.precision
from framework.config import load_recipe
from framework.lm import load_lm
from framework.lm.pretrain import pretrain
from framework.training.strategies import trainer_arguments

WARNING_LOGGER = framework.precision.__name__


@pytest.fixture(params=[False, True], ids=["emulated", "native"])
def native(request, monkeypatch) -> bool:
    """This CPU as one without native 16-bit products, and as one with them."""
    monkeypatch.setattr(framework.precision, "native_on_cpu", lambda dtype: request.param)
    return request.param


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WARNING_LOGGER]


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"),
                                                  ("16-mixed", "float16"), ("32-true", None)])
def test_train_warns_of_a_16_bit_precision_the_cpu_only_emulates(precision, dtype, native, caplog):
    recipe = load_recipe(None, [f"train.precision={precision}"])
    with caplog.at_level("WARNING", logger=WARNING_LOGGER):
        arguments = trainer_arguments(recipe)
    assert arguments["precision"] == precision  # a warning: the same recipe runs on a GPU
    messages = _warnings(caplog)
    if native or dtype is None or torch.cuda.is_available():
        assert messages == []
    else:
        assert len(messages) == 1
        assert f"train.precision={precision}" in messages[0] and f"native {dtype}" in messages[0]
        assert "Use train.precision=32-true on this machine" in messages[0]


def test_pretrain_and_the_lm_warn_of_a_16_bit_dtype_the_cpu_only_emulates(native, tmp_path, caplog):
    overrides = [f"workdir={tmp_path}", *TINY_PRETRAIN, "pretrain.steps=2", "pretrain.val_every=2",
                 "pretrain.val_batches=1", "pretrain.precision=bf16-mixed"]
    recipe = load_recipe(None, overrides)
    with caplog.at_level("WARNING", logger=WARNING_LOGGER):
        pretrain(recipe)
        load_lm(load_recipe(None, [*overrides, "lm.dtype=bfloat16"]))
    messages = _warnings(caplog)
    if native:
        assert messages == []
    else:
        assert [m.split(" on a CPU")[0] for m in messages] == ["pretrain.precision=bf16-mixed", "lm.dtype=bfloat16"]
        assert "Use pretrain.precision=32-true" in messages[0] and "Use lm.dtype=float32" in messages[1]


def test_the_check_reads_torchs_own_dispatch_condition():
    # The predicate torch's CPU matmul consults before handing a 16-bit product to oneDNN.
    assert framework.precision.native_on_cpu("bfloat16") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert framework.precision.native_on_cpu("float16") == torch.ops.mkldnn._is_mkldnn_fp16_supported()
