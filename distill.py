"""Distillation beats RL for small models: DeepSeek-R1 §2.4 and §4.1 in miniature.

R1 fine-tuned small dense models (Qwen, Llama) on 800k samples written by DeepSeek-R1, SFT only, and
found (R1 Table 6) that the distilled Qwen-32B beats the same model trained with large-scale RL
(AIME 72.6% vs 47.0%). A small model rarely SAMPLES the good behaviour, so RL has little to
reinforce; a teacher shows it directly. The recipe:

    1. rejection sampling   the RL teacher answers training prompts; keep only correct,
                            well-formed responses (grpo's rules: format == 1 and accuracy == 1)
    2. sequence-level KD    SFT on the kept traces, loss on response tokens only (prompt masked):
                            L = -(1/|o|) sum_t log p_student(o_t | q, o_<t)       (what R1 did)
    3. token-level KD       the teacher's whole next-token distribution at each response position
                            (possible because both share one tokenizer):
                            L = T^2 (1/|o|) sum_t KL(softmax(z_t/T) || softmax(z_s/T)),
                            z_t, z_s the teacher's and student's logits at (q, o_<t)

The comparison, per seed, from one pretrained student (train.py's student_config: dense, no MoE,
no MTP, 0.41M parameters vs the teacher's 1.9M), at EQUAL NUMBER OF UPDATES (--updates steps):
    (a) the student base (pretraining only)
    (b) + GRPO (grpo.rl_train on the student: 16 prompts x G = 8 rollouts per update)
    (c) + distillation (SFT on teacher traces, --batch-size traces per update), and token-level KD
    (d) optional (--distill-rl-updates N, off by default): distillation, then low-lr GRPO
Held-out greedy accuracy, averaged over --seeds post-training seeds (RL sampling and trace order;
the student is pretrained once, --student-seed), with the spread. The teacher's figures beside.
Writes out/distill/: summary.json, table.md, distill.png.

    python distill.py                         # teacher out/grpo/ckpt.pt -> out/distill/
    python distill.py --seeds 1 --updates 20  # quicker
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import grpo
import train

METHODS = ("student_base", "student_rl", "student_distill", "student_token_kd",
           "student_distill_rl")
LABELS = {"student_base": "(a) student base",
          "student_rl": "(b) student + GRPO",
          "student_distill": "(c) student + distillation (SFT)",
          "student_token_kd": "(c') student + token-level KD",
          "student_distill_rl": "(d) distillation, then GRPO"}


@dataclass
class DistillConfig:
    teacher: str = "out/grpo/ckpt.pt"  # the RL teacher's checkpoint (python grpo.py writes it)
    student: str = ""             # a pretrained student checkpoint; "" = pretrain one here
    out: str = "out/distill"      # output folder: summary.json, table.md, distill.png
    overwrite: bool = False       # replace an earlier run's files in --out (else it refuses)
    seeds: int = 3                # post-training seeds (RL sampling, trace order)
    student_seed: int = 0         # the student's pretraining seed
    student_steps: int = 600      # pretraining steps of the student
    trace_prompts: int = 1024     # training prompts the teacher answers
    trace_samples: int = 2        # teacher samples per prompt (rejection sampling keeps right ones)
    trace_temperature: float = 0.6  # the teacher's sampling temperature
    updates: int = 40             # optimizer updates of (b), (c) and (c'): equal student compute
    batch_size: int = 128         # traces per distillation update (= GRPO's 16 x G = 8 rollouts)
    lr: float = 1e-3              # distillation lr (AdamW, constant after 5 warm-up steps)
    kd_temperature: float = 1.0   # the softening T of token-level KD
    rl_lr: float = 3e-4           # GRPO on the student (b): the best of a sweep, see the README
    distill_rl_updates: int = 0   # (d): GRPO updates after distillation (0 = skip)
    distill_rl_lr: float = 3e-5   # (d)'s lr: low, a high lr undoes what distillation taught
    n: int = 200                  # held-out evaluation problems
    threads: int = 0              # CPU threads (0 = torch's default)
    device: str = "auto"          # auto (cuda, then mps, then cpu) | cpu | cuda | mps

    def validate(self) -> None:
        counts = (self.seeds, self.updates, self.batch_size, self.trace_prompts,
                  self.trace_samples, self.n)
        if min(counts) < 1:
            raise ValueError("seeds, updates, batch_size, trace_prompts, trace_samples and n "
                             "must be >= 1")
        if not self.trace_temperature >= 0:
            raise ValueError("trace_temperature must be >= 0")
        rates = {"--lr": self.lr, "--rl-lr": self.rl_lr, "--distill-rl-lr": self.distill_rl_lr,
                 "--kd-temperature": self.kd_temperature}
        train.check_shared(rates, self.threads, self.device, self.out)


# ---- teacher traces


def keep_trace(text: str, target: int) -> bool:
    """Rejection sampling's filter: the response is well-formed (grpo.format_reward) AND its answer
    is right (grpo.accuracy_reward). Both are rules that parse the text; nothing is executed."""
    ### BEGIN SOLUTION: rejection sampling: keep well-formed AND correct (R1 §2.3.3)
    return grpo.format_reward(text) == 1.0 and grpo.accuracy_reward(text, target) == 1.0
    ### END SOLUTION


@torch.no_grad()
def teacher_traces(teacher: train.Transformer, enc, problems: list[tuple[int, int]], width: int,
                   samples: int, temperature: float, seed: int = 0, chunk: int = 256,
                   world: str = "zero") -> tuple[grpo.Rollout, dict]:
    """The teacher answers every problem `samples` times; keep_trace filters. Returns the kept rows
    as a grpo.Rollout (tokens [N, T] right-padded, mask [N, T-1] on response tokens) and counts."""
    g = torch.Generator(device=next(teacher.parameters()).device).manual_seed(seed)
    n_new = train.max_response_tokens(width, world, enc)
    kept = []
    n_generated = 0
    # 1. sample in chunks, keeping the rows that pass the filter
    for i in range(0, len(problems), chunk):
        part = problems[i:i + chunk]
        ro = grpo.rollout(teacher, enc, grpo.template(part, width, world),
                          [a + b for a, b in part],
                          samples, temperature, n_new, generator=g)
        for j, (text, target) in enumerate(zip(ro.texts, ro.targets)):
            if keep_trace(text, target):
                kept.append((ro.tokens[j], ro.mask[j], text, target))
        n_generated += len(ro.texts)
    if not kept:
        raise SystemExit(f"error: rejection sampling kept none of the teacher's {n_generated} "
                         f"samples (none right and well-formed): train the teacher further "
                         f"(python grpo.py), or raise --trace-prompts / --trace-samples")
    # 2. align the chunks, each padded to its own length: F.pad to T (a negative pad crops)
    T = max(int(m.nonzero().max()) + 2 for _, m, _, _ in kept)          # last response token + 1
    pad = teacher.args.pad_id
    tokens = torch.stack([F.pad(t, (0, T - len(t)), value=pad) for t, _, _, _ in kept])
    mask = torch.stack([F.pad(m, (0, T - 1 - len(m))) for _, m, _, _ in kept])
    texts = [k[2] for k in kept]
    stats = {"n_traces_generated": n_generated, "n_traces_kept": len(kept),
             "think_rate_kept": grpo.mean_of(grpo.thinks, texts)}
    traces = grpo.Rollout(tokens, mask, torch.zeros(len(kept), dtype=torch.long),
                          torch.ones(len(kept)), texts, [k[3] for k in kept], 0.0)
    return traces, stats


# ---- the two distillation losses


def response_logits(model: train.Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Main-head logits predicting tokens[:, 1:] (MTP modules ignored): [N, T] -> [N, T-1, V]."""
    return model.logits(model.forward_hidden(tokens[:, :-1], mode="naive")).float()


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level KD = SFT: mean NLL of the response tokens; prompt and padding positions
    (mask 0) contribute nothing. logits [N, T-1, V] predict tokens[:, 1:]; mask [N, T-1]."""
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")   # [N, T-1]
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Token-level KD (Hinton et al. 2015): T^2 x mean over response positions of
    KL(softmax(z_t/T) || softmax(z_s/T)). 0 iff the distributions agree at every masked position,
    > 0 otherwise. student_logits, teacher_logits [N, T-1, V]; mask [N, T-1]."""
    log_s = (student_logits / temperature).log_softmax(-1)
    log_t = (teacher_logits / temperature).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)                                    # [N, T-1]
    return temperature ** 2 * (kl * mask).sum() / mask.sum().clamp_min(1)


def distill_train(student: train.Transformer, traces: grpo.Rollout, cfg: DistillConfig,
                  mode: str = "seq", teacher: train.Transformer | None = None, seed: int = 0
                  ) -> list[float]:
    """cfg.updates AdamW steps on minibatches of traces (shuffled epochs), in place. mode "seq":
    sft_loss; "token": kd_loss against the teacher's logits on the same traces. Returns the loss
    of every update."""
    if mode not in ("seq", "token") or (mode == "token" and teacher is None):
        raise ValueError(f"mode must be 'seq' or 'token' (token needs the teacher), got {mode!r}")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    student.train()
    for step in range(cfg.updates):
        # 1. the next minibatch of a shuffled pass over the traces, padding columns trimmed
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(traces.tokens), generator=g)])
        idx = order[:cfg.batch_size]
        order = order[cfg.batch_size:]
        mask = traces.mask[idx]
        T = int(mask.nonzero()[:, 1].max()) + 2
        tokens = traces.tokens[idx][:, :T]
        mask = mask[:, :T - 1]
        # 2. the loss: SFT on the trace, or KL to the teacher's distribution at each position
        logits = response_logits(student, tokens)
        if mode == "seq":
            loss = sft_loss(logits, tokens, mask)
        else:
            with torch.no_grad():
                teacher_logits = response_logits(teacher, tokens)
            loss = kd_loss(logits, teacher_logits, mask, cfg.kd_temperature)
        # 3. one AdamW step after a 5-step warm-up
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


# ---- the comparison


def trainable_copy(model: train.Transformer) -> train.Transformer:
    return grpo.frozen_copy(model).train().requires_grad_(True)


def pretrained_student(cfg: DistillConfig, teacher_cfg: train.Config, seed: int, device: str):
    """--student CKPT, or pretrain one with train.py's student_config on the teacher's world and
    seed `seed`. Returns (model, tokenizer, Config)."""
    if cfg.student:
        model, enc, scfg, _ = train.load_checkpoint(cfg.student, device)
        return model, enc, scfg
    scfg = train.student_config(teacher_cfg)
    scfg.train = dataclasses.replace(scfg.train, steps=cfg.student_steps,
                                     eval_interval=cfg.student_steps, seed=seed, eval_n=cfg.n,
                                     resume=False, fp8=False, compile=False, device=device,
                                     out=os.path.join(cfg.out, "student"))
    train.train(scfg)
    model, enc, _, _ = train.load_checkpoint(os.path.join(scfg.train.out, "ckpt.pt"), device)
    return model, enc, scfg


def student_rl(model: train.Transformer, enc, scfg: train.Config, steps: int, lr: float, n: int,
               seed: int) -> dict:
    """grpo.py's own training loop on the student, in place: its defaults except steps and lr.
    Returns rl_train's summary (held-out accuracy before and after)."""
    g = grpo.GRPOConfig(steps=steps, lr=lr, n=n, pass_k=1, eval_interval=steps, bench_prompts=0,
                        seed=seed)
    return grpo.rl_train(model, enc, g, None, scfg, verbose=False)


def pick(summary: dict, when: str) -> dict:
    """accuracy, think_rate and length of an rl_train summary, 'before' or 'after'."""
    return {k: summary[f"{k}_{when}"] for k in ("accuracy", "think_rate", "length")}


def one_seed(cfg: DistillConfig, teacher: train.Transformer, enc, traces: grpo.Rollout,
             student: train.Transformer, scfg: train.Config, seed: int) -> dict:
    """(a)-(d) from the pretrained student; `seed` drives RL sampling and the order of the traces.
    Returns {method: {accuracy, think_rate, length, seconds}}."""
    width = scfg.train.max_digits
    heldout = train.eval_split("heldout", cfg.n, width)
    torch.manual_seed(seed)
    out = {}

    def say(m: str) -> None:
        print(f"  seed {seed} | {LABELS[m]:34s} accuracy {out[m]['accuracy']:.3f} | "
              f"think rate {out[m]['think_rate']:.2f} | {out[m]['seconds']:.0f}s", flush=True)

    # 1. (a) and (b): the base, and GRPO on the student
    t = time.time()
    rl = student_rl(trainable_copy(student), enc, scfg, cfg.updates, cfg.rl_lr, cfg.n, seed)
    out["student_base"] = {**pick(rl, "before"), "seconds": 0.0}
    out["student_rl"] = {**pick(rl, "after"), "seconds": time.time() - t}
    say("student_base")
    say("student_rl")
    # 2. (c) and (c'): SFT on the traces, token-level KD; (d) GRPO after SFT if asked
    for method, mode in (("student_distill", "seq"), ("student_token_kd", "token")):
        t = time.time()
        model = trainable_copy(student)
        losses = distill_train(model, traces, cfg, mode, teacher, seed)
        seconds = time.time() - t
        ev = grpo.evaluate_policy(model, enc, heldout, width, k=1, seed=seed,
                                  world=scfg.train.world)
        out[method] = {"accuracy": ev["accuracy"], "think_rate": ev["think_rate"],
                       "length": ev["mean_length"], "seconds": seconds, "final_loss": losses[-1]}
        say(method)
        if mode == "seq" and cfg.distill_rl_updates:
            t = time.time()
            rl = student_rl(model, enc, scfg, cfg.distill_rl_updates, cfg.distill_rl_lr, cfg.n,
                            seed)
            out["student_distill_rl"] = {**pick(rl, "after"), "seconds": seconds + time.time() - t}
            say("student_distill_rl")
    return out


def summarize(per_seed: list[dict], teacher_ev: dict, trace_stats: dict, cfg: DistillConfig,
              wall: float) -> dict:
    """Flat summary: <method>_accuracy (mean over seeds), _std, _min, _max, _by_seed,
    _think_rate, _length, _seconds."""
    s = {"teacher_accuracy": teacher_ev["accuracy"], "teacher_think_rate": teacher_ev["think_rate"],
         "teacher_length": teacher_ev["mean_length"]}
    for m in (m for m in METHODS if m in per_seed[0]):
        acc = [r[m]["accuracy"] for r in per_seed]
        s[f"{m}_accuracy"] = statistics.mean(acc)
        s[f"{m}_accuracy_std"] = statistics.pstdev(acc)
        s[f"{m}_accuracy_min"] = min(acc)
        s[f"{m}_accuracy_max"] = max(acc)
        s[f"{m}_accuracy_by_seed"] = acc
        for key in ("think_rate", "length", "seconds"):
            s[f"{m}_{key}"] = statistics.mean(r[m][key] for r in per_seed)
    s["distill_minus_rl"] = s["student_distill_accuracy"] - s["student_rl_accuracy"]
    s["distill_over_teacher"] = s["student_distill_accuracy"] / max(s["teacher_accuracy"], 1e-9)
    s.update(**trace_stats, seeds=len(per_seed), updates=cfg.updates, batch_size=cfg.batch_size,
             distill_rl_updates=cfg.distill_rl_updates, rl_lr=cfg.rl_lr, lr=cfg.lr,
             wall_seconds=wall)
    return s


def table(s: dict) -> str:
    """The comparison as a markdown table (printed and saved as table.md)."""
    rows = ["| model | held-out accuracy (greedy) | spread over seeds | think rate | length |",
            "|---|---|---|---|---|",
            f"| teacher (GRPO checkpoint) | {s['teacher_accuracy']:.3f} | - | "
            f"{s['teacher_think_rate']:.2f} | {s['teacher_length']:.0f} |"]
    for m in (m for m in METHODS if f"{m}_accuracy" in s):
        rows.append(f"| {LABELS[m]} | {s[m + '_accuracy']:.3f} ± {s[m + '_accuracy_std']:.3f} | "
                    f"{s[m + '_accuracy_min']:.3f}-{s[m + '_accuracy_max']:.3f} | "
                    f"{s[m + '_think_rate']:.2f} | {s[m + '_length']:.0f} |")
    return "\n".join(rows)


def plot(s: dict, path: str) -> None:
    """Bar chart: mean accuracy per method with each seed as a dot; the teacher as a dashed line.
    A bare Figure, not pyplot: saving a file must not switch a notebook's backend."""
    from matplotlib.figure import Figure
    methods = [m for m in METHODS if f"{m}_accuracy" in s]
    x = range(len(methods))
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    colors = ["#999", "#d62728", "#2ca02c", "#98df8a", "#1f77b4"][:len(methods)]
    ax.bar(x, [s[m + "_accuracy"] for m in methods],
           yerr=[s[m + "_accuracy_std"] for m in methods], color=colors, capsize=4)
    for i, m in enumerate(methods):
        ax.plot([i] * s["seeds"], s[m + "_accuracy_by_seed"], "k.", alpha=0.6)
    ax.axhline(s["teacher_accuracy"], ls="--", color="k",
               label=f"teacher {s['teacher_accuracy']:.2f}")
    names = [LABELS[m].split(" ", 1)[1].replace("student + ", "+ ") for m in methods]
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylim=(0, 1.02), ylabel="held-out accuracy (greedy)",
           title=f"small dense student, {s['updates']} updates each, {s['seeds']} seeds")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: DistillConfig) -> dict:
    """The whole comparison; writes summary.json, table.md, distill.png to cfg.out."""
    cfg.validate()
    t0 = time.time()
    device = train.pick_device(cfg.device)
    # 1. the teacher, and its held-out figures
    teacher, enc, teacher_cfg, _ = train.load_checkpoint(cfg.teacher, device)
    teacher.eval().requires_grad_(False)
    os.makedirs(cfg.out, exist_ok=True)
    width = teacher_cfg.train.max_digits
    heldout = train.eval_split("heldout", cfg.n, width)
    world = teacher_cfg.train.world
    teacher_ev = grpo.evaluate_policy(teacher, enc, heldout, width, k=1, world=world)
    print(f"teacher {cfg.teacher}: held-out accuracy {teacher_ev['accuracy']:.3f}, think rate "
          f"{teacher_ev['think_rate']:.2f}", flush=True)
    # 2. rejection sampling on training prompts (never a held-out one)
    excluded = set(train.eval_split("heldout", max(cfg.n, teacher_cfg.train.eval_n), width))
    rng = random.Random("distill-traces")
    problems = grpo.training_problems(rng, cfg.trace_prompts, width, excluded)
    traces, trace_stats = teacher_traces(teacher, enc, problems, width, cfg.trace_samples,
                                         cfg.trace_temperature, world=world)
    print(f"rejection sampling: kept {trace_stats['n_traces_kept']} of "
          f"{trace_stats['n_traces_generated']} teacher samples (T = {cfg.trace_temperature}) | "
          f"{time.time() - t0:.0f}s", flush=True)
    # 3. the student (same tokenizer as the teacher), then every method per seed
    student, student_enc, scfg = pretrained_student(cfg, teacher_cfg, cfg.student_seed, device)
    if train.tokenizer_state(student_enc) != train.tokenizer_state(enc):
        raise SystemExit("error: the student's tokenizer differs from the teacher's: traces and "
                         "token-level KD need one tokenizer; pretrain the student on the "
                         "teacher's world (omit --student)")
    per_seed = [one_seed(cfg, teacher, enc, traces, student, scfg, seed)
                for seed in range(cfg.seeds)]
    # 4. the files
    s = summarize(per_seed, teacher_ev, trace_stats, cfg, time.time() - t0)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(table(s) + "\n")
    plot(s, os.path.join(cfg.out, "distill.png"))
    return s


# ---- command line


def parse_config(argv: list[str] | None = None) -> DistillConfig:
    return train.config_from_flags(DistillConfig(), argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not os.path.isfile(cfg.teacher):
        raise SystemExit(f"error: no teacher checkpoint at {cfg.teacher}: run `python train.py` "
                         f"then `python grpo.py` first (or pass --teacher CKPT)")
    if not cfg.overwrite:
        files = ("summary.json", "table.md", os.path.join("student", "ckpt.pt"))
        train.check_fresh_out(cfg.out, files, resume_flag=False)
    s = run(cfg)
    print(table(s))
    print(f"distilled - RL-only: {100 * s['distill_minus_rl']:+.1f} points | distilled / teacher: "
          f"{100 * s['distill_over_teacher']:.0f}% | {s['wall_seconds']:.0f}s | "
          f"{cfg.out}/summary.json")


if __name__ == "__main__":
    main(sys.argv[1:])
