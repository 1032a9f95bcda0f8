"""`modelzoo generate`: continue a prompt with a run's model or a Hugging Face export; print tokens/s."""

from __future__ import annotations

from modelzoo.config import Config, GenerateConfig
from modelzoo.generate import Generation, Sampling, encode_prompt, format_speed, generate
from modelzoo.inference import load_for_inference
from modelzoo.validate import validated_config


def run(cfg: Config) -> tuple[str, Generation]:
    """Load the model of a validated `cfg` (`task.hf_dir`, `task.checkpoint` or `run_dir`), decode; return the prompt
    with its continuation."""
    task: GenerateConfig = cfg.task
    choices = ((task.hf_dir, "task.hf_dir"), (task.checkpoint, "task.checkpoint"), (cfg.run_dir, "run_dir"))
    source, key = next((path, key) for path, key in choices if path)
    loaded = load_for_inference(source, key, task.device, task.precision, task.converter, tokens=1)
    tokenizer = loaded.tokenizer
    sampling = Sampling(task.temperature, task.top_k, task.top_p)
    prompt = encode_prompt(tokenizer, task.prompt)
    eos = tokenizer.eos_token_id
    result = generate(loaded.model, prompt, task.max_new_tokens, sampling, eos, cfg.seed, task.use_cache)
    return task.prompt + tokenizer.decode(result.tokens, skip_special_tokens=True), result


def main(overrides: list[str]) -> None:
    text, result = run(validated_config(overrides, "generate"))
    print(text)
    print(format_speed(result))
