"""A quiet console: the stages that load models print their own progress bars and summary lines, not library noise.

`quiet_libraries()` turns off these lines, each at the library that writes it and through that library's own
logging or progress-bar switch. None of them says anything about the run:

- bitsandbytes, logger `bitsandbytes.backends.cpu.ops`: "Failed to load CPU gemm_4bit_forward from
  kernels-community: No module named 'kernels'. Please make sure you already `pip install kernels` ...". Written once,
  while bitsandbytes is imported, on a CPU with AVX512-BF16 when the optional `kernels` package is absent.
  bitsandbytes then uses its own CPU kernel instead, and 4-bit (QLoRA) training works either way. It is the only
  thing that logger writes, so that one logger is set to ERROR.
- DeepSpeed, logger `DeepSpeed`: "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
  detect it." Written to stdout the first time deepspeed is imported (accelerate imports it inside every
  `save_pretrained`, and distributed.launch imports it when DeepSpeed is on) on a machine where torch finds no GPU.
  The Trainer runs on the device torch picks, so on such a machine CPU is what the user asked for. That logger
  carries every other DeepSpeed warning too (ZeRO config, offload, ...), so a filter drops this one record and the
  logger keeps its level. DS_ACCELERATOR=cpu would also silence it, but it would force CPU on a machine with a GPU.
- transformers' progress bars "Loading weights" (every `from_pretrained`) and "Writing model shards" (every
  `save_pretrained`), through `transformers.utils.logging.disable_progress_bar()`. They come and go within a second,
  several times per stage, around the stage's own bars. That switch also turns off huggingface_hub's bars, which
  measure downloads and uploads (a hub model, `push.target: hf`), where a long silence would look like a hang, so
  those are turned back on. A user who set HF_HUB_DISABLE_PROGRESS_BARS=0 asked for every bar (transformers reads that
  variable for its own bars too): then nothing is turned off.

- diffusers' progress bars "Loading pipeline components" (every pipeline `from_pretrained`) and the sampling steps
  of every pipeline call, through `diffusers.utils.logging.disable_progress_bar()`: evaluate_t2v calls a pipeline
  once per batch and shows its own summary. Only once diffusers is imported: importing it costs 3 s, and only the
  text-to-video stages use it (their main() calls `quiet_libraries()` after their imports).
- diffusers, logger `diffusers.models.modeling_utils`: "There are modules in UNetMotionModel that should be kept in
  float32: []. Casting directly with `to()` can lead to inconsistent results ...", written when AnimateDiff's
  `UNetMotionModel.from_unet2d` casts the new model to the UNet's dtype (train_t2v's tiny build). The list is empty:
  no module needs keeping, so a filter drops exactly that record (with an empty list) and the logger keeps its level.

Everything else still reaches the console: Python warnings (`warnings.warn`), transformers' logger, every other
logger, and the stages' tqdm bars (the trainers' step bar, stages.training.trainer.ProgressBar, stands in for the
Trainer's printing of every log line as a dict; dvclive keeps those lines).

Some of it is written while a library is imported, and a stage imports bitsandbytes (through `from transformers
import Trainer`, which imports peft) before its main() runs. So the settings are applied when this module is
imported, and the stages import it ahead of transformers; their main() calls `quiet_libraries()` again, which changes
nothing then (it is idempotent) but shows where a stage quiets the console.
"""
import logging
import sys

BITSANDBYTES_CPU_OPS = "bitsandbytes.backends.cpu.ops"
DEEPSPEED_CPU_FALLBACK = "Setting accelerator to CPU."
DIFFUSERS_MODELING = "diffusers.models.modeling_utils"
NOTHING_KEPT_IN_FLOAT32 = "should be kept in float32: []."


def not_deepspeed_cpu_fallback(record: logging.LogRecord) -> bool:
    """A filter for the `DeepSpeed` logger: every record but the CPU fallback notice."""
    return not record.getMessage().startswith(DEEPSPEED_CPU_FALLBACK)


def not_empty_float32_notice(record: logging.LogRecord) -> bool:
    """A filter for diffusers' modeling logger: every record but the float32 notice that names no module."""
    return NOTHING_KEPT_IN_FLOAT32 not in record.getMessage()


def quiet_libraries() -> None:
    """Silence the lines listed in this module's docstring; safe to call any number of times."""
    import huggingface_hub.constants
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    # Loggers are set by name, so that the setting is in place before the library that creates them is imported.
    logging.getLogger(BITSANDBYTES_CPU_OPS).setLevel(logging.ERROR)
    # A filter, not a level: deepspeed resets the level of its logger when it is imported, and keeps its filters.
    logging.getLogger("DeepSpeed").addFilter(not_deepspeed_cpu_fallback)   # added once: addFilter skips a duplicate
    logging.getLogger(DIFFUSERS_MODELING).addFilter(not_empty_float32_notice)
    if huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS is not False:
        hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()
        if hub_bars:
            huggingface_hub.utils.enable_progress_bars()
        if "diffusers" in sys.modules:   # importing it here would cost every stage 3 s (train_t2v's main() calls this)
            import diffusers.utils.logging
            diffusers.utils.logging.disable_progress_bar()


# At import, for the lines written while a library is imported (see the docstring's last paragraph).
quiet_libraries()
