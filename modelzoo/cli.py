"""`modelzoo <command> [args]`: finds the command's module in `modelzoo.tasks` and hands it the arguments.

Command names are kebab-case (`prompt-tune`, `prepare-data`); the snake_case spelling is accepted too.
"""

from __future__ import annotations

import importlib
import logging
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from modelzoo.errors import ModelZooError
from modelzoo.exits import fail, fail_unexpected

USAGE = """usage: modelzoo <command> [hydra overrides]

commands:
  pretrain   pre-train a GPT and export it to Hugging Face
             (default: tiny model, 75% static sparsity, the embedded PubMed sample)
  prepare-data [--dry-run] [--cerebras-hdf5=DIR]
             tokenise the data corpus in data.num_workers processes into memory-mapped shards (the cache
             pretrain reads); --dry-run estimates the size; --cerebras-hdf5 also writes Cerebras GPT HDF5 shards
  export     export a run's checkpoint to a Hugging Face directory
  generate   continue a prompt with a run's model (greedy or sampled, KV cache), print tokens/s
  finetune   fine-tune a pre-trained run on PubMedQA or HoC, densely (masks dropped) or keeping its sparsity
  prompt-tune  soft prompting of a frozen pre-trained run (PEFT prompt-tuning adapter)
  prune      one-shot pruning (SparseGPT, Wanda, magnitude) of a run or an HF directory to a sparse HF directory
  evaluate   zero-shot PubMedQA accuracy / macro-F1 of checkpoints and HF directories: table, JSON, plot
  info [--gpus=N]
             parameter counts of a model size and the memory a GPU needs to train it: a DDP replica, or
             with task.parallelism=fsdp one of N GPUs sharding it with FSDP2 (default 8)
  flops      dense and sparse-effective training FLOPs of a config
  import-cerebras PARAMS.yaml OUT_DIR [CHECKPOINT]
             a Cerebras Model Zoo GPT params file as our config options (OUT_DIR/conf), and its checkpoint
             (torch.save or safetensors, *_mask buffers or NaN-pruned weights) as run OUT_DIR's step 0
  export-cerebras
             a run's checkpoint as a Cerebras Model Zoo params.yaml and model.mdl (task.output_dir)

examples:
  modelzoo pretrain
  modelzoo pretrain model=med sparsity=static_50 data=pubmed_abstracts task.max_steps=5000
  modelzoo pretrain sparsity=dense task.precision=bf16 task.device=cuda
  modelzoo pretrain run_dir=runs/tiny-static_75 task.resume=true
  modelzoo pretrain backend=cerebras cluster=cs2 cluster.mode=compile_only   (cerebras.pytorch venv: lower for a CS-2)
  modelzoo prepare-data data=pubmed_abstracts data.num_workers=2 --dry-run
  modelzoo export run_dir=runs/tiny-static_75 task.output_dir=exported/
  modelzoo generate run_dir=runs/tiny-static_75 'task.prompt="The patient"' task.converter=torch_sparse
  modelzoo generate task.hf_dir=exported/ task.prompt=Aspirin task.temperature=0.8 task.top_p=0.95 seed=7
  modelzoo finetune task.pretrained=runs/tiny-static_75 task.sparsity=dense task.dataset=pubmedqa
  modelzoo prompt-tune task.pretrained=runs/tiny-static_75 task.dataset=hoc task.num_virtual_tokens=20
  modelzoo prune run_dir=runs/tiny-dense task.method=sparsegpt task.sparsity=0.5
  modelzoo prune task.hf_dir=DIR task.method=wanda task.n_m=[2,4] task.output_dir=pruned/
  modelzoo evaluate task.checkpoints=[runs/tiny-dense,runs/tiny-static_75] task.hf_dirs=[exported/]
  modelzoo info model=xl task.micro_batch_size=8 data.seq_len=2048 task.precision=bf16
  modelzoo info model=llama2_7b sparsity=static_75 task.parallelism=fsdp task.precision=bf16 --gpus=16
  modelzoo flops model=xl sparsity=static_75
  modelzoo import-cerebras params_gpt3_xl.yaml imported/ model.mdl
  modelzoo export-cerebras run_dir=runs/tiny-static_75 task.output_dir=cerebras/
  modelzoo pretrain --cfg job        (print the composed config; any Hydra flag works after pretrain)

config groups (conf/): model={tiny,med,large,xl}
  sparsity={dense,static_50,static_75,gmp_75,set_75,rigl_75,nm_2_4,cerebras_gpt3_125m_rigl75}
  backend={auto,masked_dense,cerebras} cluster={local,cs2}
  data={pubmed_sample,pubmed_abstracts,hub} tokenizer={bpe,gpt2} optim={adamw}
  task={pretrain,export,generate,prune,evaluate,finetune,prompt_tune}
"""

# command -> "module:function" in modelzoo.tasks, imported when the command runs.
COMMANDS: dict[str, str] = {
    "pretrain": "pretrain:main",
    "prepare-data": "prepare_data:main",
    "export": "export:main",
    "generate": "generate:main",
    "prune": "prune:main",
    "finetune": "finetune:finetune",
    "prompt-tune": "finetune:prompt_tune",
    "evaluate": "evaluate:main",
    "info": "info:info",
    "flops": "info:flops",
    "import-cerebras": "cerebras:import_main",
    "export-cerebras": "cerebras:export_main",
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0].replace("_", "-"), args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module, _, function = COMMANDS[command].partition(":")
    run = getattr(importlib.import_module(f"modelzoo.tasks.{module}"), function)
    try:
        run(rest)
    except (ModelZooError, OmegaConfBaseException, HydraException) as e:
        fail(e)
    except Exception as e:
        fail_unexpected(e)
