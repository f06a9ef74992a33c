"""Language-model preset of the universality pipeline (flags; filled in below)."""

from absl import flags

flags.DEFINE_string("model_a", None, "Model A: local transformers directory (or hub name).")
flags.DEFINE_string("model_b", None, "Model B: local transformers directory (or hub name).")


def run_lm(run, flags_, cfg, cache):
    raise NotImplementedError
