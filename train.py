"""FUSION training: the same program on a 2-core CPU and on a multi-host TPU pod.

    python train.py                                   # configs/tiny.py: offline, synthesized data
    python train.py --config configs/fusion_3b_phi35_stage1.py --workdir /ckpt/s1 \
        --config.data.path=... --config.init_from=/ckpt/converted_stage0
    python train.py --config configs/tiny.py --config.total_steps=100 --config.mesh='(2,2,2)' \
        --config.model.linear_2d=False   # one-device CPU choice; sharded, XLA:CPU deadlocked on it

Rerunning the same command resumes from WORKDIR/checkpoints/<latest>. SIGTERM/SIGINT save a
checkpoint and exit cleanly. See fusion_jax/train/ for the pieces.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(HERE, "configs", "tiny.py"),
                                "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "output directory, a local path or a gs:// URL (default: runs/<config name>)")
FLAGS = flags.FLAGS


def skip_tpu_probe():
    """libtpu installed (the tpu-aot extra) on a host without TPU chips: JAX would still start the TPU
    runtime, which waits on the cloud metadata server and prints warnings. aot_compile, which needs
    libtpu for TPU topologies, does not come through here."""
    import importlib.util

    import jax
    from jax._src import hardware_utils  # JAX's own look for TPU chips on the PCI bus
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0 and not hardware_utils.has_visible_nvidia_gpu():
        jax.config.update("jax_platforms", "cpu")


def main(argv):
    del argv
    skip_tpu_probe()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from fusion_jax.train.loop import TrainingError, train
    cfg_path = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") \
        else "tiny"
    name = os.path.splitext(os.path.basename(str(cfg_path).split(":")[0]))[0] or "tiny"
    workdir = FLAGS.workdir or os.path.join("runs", name)
    try:
        train(FLAGS.config, workdir)
    except TrainingError as e:
        print(f"\nERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except ValueError as e:
        if str(e).startswith("config."):
            print(f"\nCONFIG ERROR: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    app.run(main)
