"""stages/common/console.py: the libraries' noise is gone from the console, and their real warnings are still there."""
import os
import subprocess
import sys
import warnings

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.utils import logging as transformers_logging

from stages.common.console import quiet_libraries
from tests.helpers import REPO

BARS = ("Loading weights", "Writing model shards")
GEMM = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
CPU_FALLBACK = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
DIFFUSERS = ("Loading pipeline components", "should be kept in float32: [].")
NOISE = (*BARS, GEMM, CPU_FALLBACK, *DIFFUSERS)
# A 2-layer Llama with an untied lm_head: a checkpoint of the bare LlamaModel lacks it, which transformers reports
TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "tie_word_embeddings": False}

# What a stage does, in a fresh interpreter whose stdout and stderr are the console: import transformers' Trainer
# (and with it peft and bitsandbytes), load a model from a checkpoint without lm_head and save it (which imports
# deepspeed). It plays a CPU with AVX512-BF16, where bitsandbytes looks for the `kernels` package (requirements.txt
# does not install it), and the tests hide the GPUs, so that DeepSpeed falls back to CPU. argv[1] == "quiet" imports
# the console module first, as the stages do, and calls quiet_libraries() again after its imports, as their main()
# does; argv[2] is a scratch folder. TINY is filled in below.
STAGE = """
import importlib.abc, importlib.machinery, sys

class Avx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Avx512Bf16())
if sys.argv[1] == "quiet":
    import stages.common.console
import transformers.trainer
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

LlamaModel(LlamaConfig(**TINY)).save_pretrained(sys.argv[2] + "/base")
model = LlamaForCausalLM.from_pretrained(sys.argv[2] + "/base")
model.save_pretrained(sys.argv[2] + "/model")
model.gradient_checkpointing_enable()                 # a deprecated alias: transformers' own warnings.warn
from deepspeed.utils import logger
logger.warning("a real DeepSpeed warning")

# diffusers: AnimateDiff's UNet built from a 2D one (train_t2v's tiny build), a pipeline saved and loaded back
from diffusers import DDPMPipeline, DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNet2DModel, UNetMotionModel
from diffusers.utils import logging as diffusers_logging
if sys.argv[1] == "quiet":
    stages.common.console.quiet_libraries()           # as a stage's main() does, after its imports
unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
UNetMotionModel.from_unet2d(unet, MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1,
                                                motion_norm_num_groups=8))
image_unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
DDPMPipeline(image_unet, DDPMScheduler()).save_pretrained(sys.argv[2] + "/pipe")
DDPMPipeline.from_pretrained(sys.argv[2] + "/pipe")
diffusers_logging.get_logger("diffusers.models.modeling_utils").warning("a real diffusers warning")
"""


def test_a_model_loads_and_saves_without_progress_bars_and_with_its_warnings(tmp_path, capfd):
    LlamaModel(LlamaConfig(**TINY)).save_pretrained(tmp_path / "base")
    transformers_logging.enable_progress_bar()       # as transformers starts, to show that the bars would be seen
    try:
        LlamaForCausalLM.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "loud")
        loud = capfd.readouterr().err
        quiet_libraries()
        with warnings.catch_warnings(record=True) as shown:   # under the filters as they are: what a user would see
            model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
            model.save_pretrained(tmp_path / "quiet")
            model.gradient_checkpointing_enable()
        quiet = capfd.readouterr().err
    finally:
        quiet_libraries()
    assert all(bar in loud for bar in BARS)
    assert not any(bar in quiet for bar in BARS)
    assert (tmp_path / "quiet" / "model.safetensors").exists()
    assert any(issubclass(w.category, FutureWarning) and "gradient_checkpointing_enable" in str(w.message)
               for w in shown)


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_a_stage_console_has_the_real_warnings_and_no_noise(mode, tmp_path):
    run = subprocess.run([sys.executable, "-c", f"TINY = {TINY!r}\n{STAGE}", mode, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, check=True)
    console = run.stdout + run.stderr
    assert [line for line in NOISE if line in console] == (list(NOISE) if mode == "loud" else []), console
    # the real ones: transformers' load report (the checkpoint has no lm_head), its FutureWarning, DeepSpeed's logger
    assert "LOAD REPORT" in console and "lm_head.weight" in console and "MISSING" in console, console
    assert "FutureWarning: `gradient_checkpointing_enable` is deprecated" in console, console
    assert "a real DeepSpeed warning" in console, console
    assert "a real diffusers warning" in console, console


def test_the_console_module_does_not_import_diffusers():
    """Importing diffusers costs about 3 s; every stage imports this module, and only the text-to-video ones need it."""
    run = subprocess.run([sys.executable, "-c", "import sys, stages.common.console; print('diffusers' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
