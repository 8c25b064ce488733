"""The static cache's decode step compiled by Dynamo, what transformers does on CUDA (torch.compile of
the forward for the decode steps), forced on the CPU: behaviour log-probs stay exact, and a batch of
the same shape after a hot swap runs with recompiling forbidden. A backend that records each graph
Dynamo hands it shows that the decode step was compiled. Run by tests/unit/test_kv_cache.py in a
process of its own:

    python -m tests.unit.compiled_decode TINY_LM_DIR WORK_DIR
"""

from __future__ import annotations

import pathlib
import sys

import torch
from transformers import CompileConfig

from services.policy.engine import Sampling
from tests.unit.test_kv_cache import PROMPTS, assert_teacher_forced, engine_on, swapped_in, tiny_lm


def main(tiny_lm_dir: pathlib.Path, work_dir: pathlib.Path) -> None:
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = CompileConfig(backend=recording_backend, mode=None)
    compile_config._compile_all_devices = True  # transformers' own switch to compile on a CPU (its tests use it)
    engine = engine_on(tiny_lm(tiny_lm_dir), tiny_lm_dir, "static", compile_config=compile_config)
    sampling = Sampling(temperature=0.7, max_new_tokens=8, seed=9)
    assert_teacher_forced(engine.generate(PROMPTS, 2, sampling), tiny_lm(tiny_lm_dir), 0.7)
    assert graphs, "the decode step was not compiled"
    new = swapped_in(engine, work_dir, tiny_lm_dir, seed=10)
    compiled = len(graphs)
    with torch.compiler.set_stance("fail_on_recompile"):
        batch = engine.generate(PROMPTS, 2, sampling)
    assert len(graphs) == compiled
    assert_teacher_forced(batch, new, 0.7)
    print(f"{compiled} graphs compiled; behaviour log-probs exact before and after the swap")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
