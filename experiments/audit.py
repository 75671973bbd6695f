"""
experiments/audit.py -- an empirical privacy audit of the client's upload, from ONE fine-tune per
setting, after Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run"; and
what DP does not hide: the client's convention.

    python experiments/audit.py --out=out_audit --cache=out  # default preset, cached pretraining
    python experiments/audit.py --help

The auditor plants m canaries, each in the client's training independently with probability 1/2, and
sees only what the provider sees: the uploaded update vector, the public base TinyLM and the recipe.
It scores every canary, guesses "in" for the highest scores and "out" for the lowest, and turns the
number of right guesses into a 95% lower bound on epsilon (`one_run_audit`, below). Two kinds of
canary:

  gradient (white-box)  a fixed random unit direction u in the update-vector space (orthonormal
                        across canaries). An included canary joins each step's batch like a record
                        (Poisson, rate q) with gradient 2C*u, which per-example clipping makes C*u.
                        Score: -<upload, u> (descent moves against the gradient).
  input (black-box)     a record '37@52=>142' with a random, unlearnable result on an operand pair
                        no one else uses. Score: how much more likely the TinyLM rebuilt from the
                        upload makes its answer than the base TinyLM does (log-likelihood
                        difference).

Settings: no DP, DP-SGD at each epsilon, output perturbation (dp.perturb_update) at eps 8. Without
DP-SGD a gradient canary can only enter through a per-example-clipped step, so "no DP" and the clean
run under output perturbation train those with clipped, Poisson-sampled, noise-free steps; input
canaries there ride the ordinary recipe (tinylm.finetune). Every DP-SGD step here divides by the
fixed q * (n_train + m/2), never by a count that depends on who is in.

An experiment: it uses train.py (the config, the cache, the DP recipe) and dp.py, and nothing in
the method imports it. Test it: python -m pytest tests/test_audit.py -q
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import dp
import tinylm
import train
from config import stages
from config.presets import PRESETS, noise_multiplier, parse_options, recipe


@dataclass
class AuditConfig:
    out: str = "out_audit"            # audit.json and convention.json go here
    cache: str = ""                   # where train.py cached the pretrained TinyLM ("" = --out)
    preset: str = "cpu"               # train.py's preset: model sizes and the recipe
    seed: int = 0
    canaries: int = 1000              # m
    ks: str = "10,20,50,100,200,500"  # k guesses "in" and k "out"; the best k pays a union bound
    confidence: float = 0.95
    audit_delta: float = 1e-5         # the delta of the (eps, delta) the audit tries to refute
    epsilons: str = "0,8,1,0.3"       # DP-SGD settings audited (0 = no DP)
    output_epsilons: str = "8"        # output-perturbation settings audited
    leak_clients: int = 10            # uploads per operator in the convention measurement
    leak_epsilons: str = "0,1,0.3"
    leak_prompts: int = 256           # '@' prompts the convention guess reads
    threads: int = 1                  # torch threads (these matrices are small)


def parse_args(argv):
    """--key=value (or --key value) over AuditConfig's fields; --help lists them."""
    return parse_options(AuditConfig(), argv, __doc__)


def floats(text):
    return [float(t) for t in text.split(",") if t.strip()]


# -----------------------------------------------------------------------------
# auditing: a lower bound on epsilon from guesses
# Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run": m canaries, each
# included in the training data independently with probability 1/2. From the output alone the
# auditor guesses "in" or "out" for r of them (abstaining on the rest) and v guesses are right. Were
# the mechanism (eps, 0)-DP, the number right would be dominated by Binomial(r, p), p = e^eps / (1 +
# e^eps): no better than randomized response. A v so large that this tail is below 5% refutes that
# eps.


def audit_p_value(guesses, correct, epsilon, delta=0.0, canaries=None):
    """An upper bound on P[at least v of r guesses right] for an (epsilon, delta)-DP mechanism
    (Steinke et al. 2023, Thm. 3.1 and its Algorithm 2 with delta > 0; m = canaries):

        P[W >= v] <= beta + 2 m delta alpha,       p = e^eps / (1 + e^eps)
        beta  = P[Binomial(r, p) >= v]
        alpha = max over i = 1..v of  P[v - i <= Binomial(r, p) < v] / i

    delta = 0 leaves beta, the pure-DP theorem. Summed in log space (r may be thousands).
    """
    r, v = guesses, correct
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"guesses must be a non-negative integer, got {guesses!r}")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= r:
        raise ValueError(f"correct must be an integer in [0, guesses={r}], got {correct!r}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if delta > 0 and not (isinstance(canaries, (int, np.integer)) and canaries >= r):
        raise ValueError(f"canaries (m) must be an integer >= guesses={r} when delta > 0, got "
                         f"{canaries!r}")
    ### BEGIN SOLUTION audit_bound
    # log p, log(1-p)
    log_p, log_1mp = -math.log1p(math.exp(-epsilon)), -math.log1p(math.exp(epsilon))
    log_pmf = np.array([math.lgamma(r + 1) - math.lgamma(i + 1) - math.lgamma(r - i + 1)
                        + i * log_p + (r - i) * log_1mp for i in range(r + 1)])   # (r+1,)
    pmf = np.exp(log_pmf)
    beta = float(np.exp(np.logaddexp.reduce(log_pmf[v:]))) if v <= r else 0.0
    if delta == 0 or v == 0:
        return min(1.0, beta)
    below = np.cumsum(pmf[v - 1::-1])            # below[i-1] = P[v - i <= Binomial < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * canaries * delta * alpha)
    ### END SOLUTION


def epsilon_lower_bound(guesses, correct, confidence=0.95, delta=0.0, canaries=None):
    """The largest epsilon that r guesses with v right refute at this confidence: the largest eps
    with audit_p_value(r, v, eps) < 1 - confidence, by bisection (the p-value grows with eps). 0
    when even eps = 0 is not refuted. All r right, delta = 0: the closed form eps = log(p / (1 - p))
    with p = (1 - confidence)^(1/r)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    def p_value(eps):
        """The p-value of these guesses against the claim (eps, delta)."""
        return audit_p_value(guesses, correct, eps, delta, canaries)

    ### BEGIN SOLUTION audit_bound
    level = 1 - confidence
    if p_value(0.0) >= level:
        return 0.0
    lo = 0.0   # invariant: p_value(lo) < level <= p_value(hi)
    hi = 1.0
    while p_value(hi) < level:
        lo = hi
        hi = 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value(mid) < level:
            lo = mid
        else:
            hi = mid
    return lo
    ### END SOLUTION


def one_run_audit(scores, included, ks=(10, 20, 50, 100, 200, 500), confidence=0.95, delta=0.0):
    """The one-run audit from the canaries' scores (m,) and who was really in (m,) bool: for each k,
    guess "in" for the k highest scores and "out" for the k lowest, abstain on the rest; the bound
    is the best over ks, each k at confidence 1 - (1 - confidence) / len(ks) (a union bound:
    choosing the best k afterwards costs that). eps_lb_max: what all guesses right at the largest k
    would give. Returns {"eps_lb", "k", "guesses", "correct", "eps_lb_max"}."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if scores.ndim != 1 or included.shape != scores.shape or m == 0:
        raise ValueError(f"scores and included must be 1-D of the same length > 0, got "
                         f"{scores.shape} and {included.shape}")
    if not ks or any(not 0 < 2 * k <= m for k in ks):
        raise ValueError(f"ks must be non-empty with 0 < 2k <= m = {m} each, got {ks}")
    each = 1 - (1 - confidence) / len(ks)
    order = np.argsort(-scores, kind="stable")   # highest score first
    best = {"eps_lb": 0.0, "k": None, "guesses": 0, "correct": 0}
    for k in ks:
        v = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        eps = epsilon_lower_bound(2 * k, v, each, delta, m)
        if best["k"] is None or eps > best["eps_lb"]:
            best = {"eps_lb": eps, "k": k, "guesses": 2 * k, "correct": v}
    best["eps_lb_max"] = epsilon_lower_bound(2 * max(ks), 2 * max(ks), each, delta, m)
    return best


# -----------------------------------------------------------------------------
# training with canaries: tinylm.finetune's DP-SGD branch, plus gradient canaries in each batch


def canary_finetune(model, x, y, mask, recipe, seed, expected_batch, directions=None):
    """Fine-tune the LoRA of `model` from zero with Poisson-sampled, per-example-clipped steps
    (noise recipe.dp_sigma, 0 allowed) on the records (N, T) and the gradient canaries `directions`
    (n, D): each joins a step with probability q, gradient 2C * u (clipped to C * u). Returns the
    final update."""
    q, C = recipe.dp_sample_rate, recipe.dp_clip
    shape = tinylm.update_shape(model.cfg, model.lora[0])
    tinylm.set_update(model, torch.zeros(shape))
    opt = torch.optim.Adam(tinylm.lora_parameters(model), lr=recipe.lr)
    g = torch.Generator().manual_seed(seed)
    per_sample, canary_grads = dp.per_sample_grads, None
    # every canary's gradient in the LoRA parameters' shapes: {name: (n, *shape)}
    if directions is not None:
        parts = [tinylm.split_update(model, (2 * C * u).view(shape)) for u in directions]
        canary_grads = {name: torch.stack([p[name] for p in parts])
                        for name in parts[0]} if parts else None
    model.train()
    for _ in range(recipe.steps):
        idx = dp.poisson_sample(len(x), q, g)
        if canary_grads is not None:
            sampled = dp.poisson_sample(len(directions), q, g)

            # the records' gradients (B, ...), then the sampled canaries'
            def per_sample(model, xb, yb, mb):
                grads = dp.per_sample_grads(model, xb, yb, mb)
                return {name: torch.cat([g_n, canary_grads[name][sampled]])
                        for name, g_n in grads.items()}

        dp.dp_sgd_step(model, opt, x[idx], y[idx], mask[idx], clip=C,
                       noise_multiplier=recipe.dp_sigma, expected_batch_size=expected_batch,
                       generator=g, per_sample=per_sample)
    model.eval()
    return tinylm.get_update(model)


def random_directions(m, shape, seed):
    """m orthonormal directions (m, D) of the update-vector space (QR of a Gaussian matrix), m <=
    D."""
    D = math.prod(shape)
    if m > D:
        raise ValueError(f"canaries={m} gradient canaries need m <= D = {D} for orthonormal "
                         "directions")
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, m, generator=g))                           # (D, m)
    return Q.T.contiguous()


def input_canaries(task, client_train, m, rng):
    """m lines 'a@b=<op><r>' on distinct private operand pairs the client's data does not use, with
    a random operator and a result r in [0, 198] that none of the four operators gives."""
    used = {tuple(int(t) for t in line[:data.PROMPT_LEN].split("@")) for line in client_train}
    free = [p for p in task.private if p not in used]
    lines = []
    for i in rng.permutation(len(free))[:m]:
        a, b = free[i]
        right = {f(a, b) for f in data.OP_FUNCS}
        result = int(rng.choice([r for r in range(199) if r not in right]))
        lines.append(f"{a}@{b}={data.OPS[rng.integers(4)]}{result}\n")
    return lines


@torch.no_grad()
def answer_log_likelihood(model, x, y, mask):
    """(N,) log-likelihood of each line's answer (the tokens after '=': operator, digits,
    newline)."""
    logits, _ = model(x)
    logp = logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)              # (N, T)
    answer = mask.clone()
    # not the '=' itself
    answer[:, :data.PROMPT_LEN] = 0
    return (logp * answer).sum(1)


def auc(scores, included):
    """P[an included canary outscores an excluded one] (ties count 1/2): the Mann-Whitney AUC."""
    s_in, s_out = scores[included][:, None], scores[~included][None, :]
    return float((s_in > s_out).mean() + 0.5 * (s_in == s_out).mean())


# -----------------------------------------------------------------------------
# one audited setting: one fine-tune with the canaries, the scores, the bound


def audit_setting(cfg, acfg, tiny, x, y, mask, epsilon, mechanism, kind, canaries, included, seed):
    """One row of the table: the client trains once with its included canaries, the auditor scores
    all m from the upload alone. cfg: train.py's Config; epsilon 0: no DP."""
    private = replace(cfg, dp_epsilon=epsilon, dp_mechanism=mechanism or "sgd")
    sgd = epsilon > 0 and mechanism == "sgd"
    rec = recipe(private, private=sgd)   # dp_sigma 0 unless DP-SGD
    m = len(included)
    expected_batch = rec.dp_sample_rate * (len(x) + m / 2)   # fixed: never the realised count
    if kind == "gradient":
        update = canary_finetune(tiny, x, y, mask, rec, seed, expected_batch,
                                 canaries[torch.from_numpy(included)])
        scores = -(canaries @ update.flatten()).numpy()
    else:
        cx, cy, cm = canaries
        keep = torch.from_numpy(included)
        xs, ys, ms = (torch.cat([t, c[keep]]) for t, c in ((x, cx), (y, cy), (mask, cm)))
        if sgd:
            update = canary_finetune(tiny, xs, ys, ms, rec, seed, expected_batch)
        else:
            update = tinylm.finetune(tiny, xs, ys, ms, rec, seed)[-1]
    if mechanism == "output":
        update = train.perturb(private, update, seed)
        if kind == "gradient":
            scores = -(canaries @ update.flatten()).numpy()
    if kind == "input":
        tinylm.set_update(tiny, torch.zeros_like(update))
        base = answer_log_likelihood(tiny, cx, cy, cm)
        tinylm.set_update(tiny, update)
        scores = (answer_log_likelihood(tiny, cx, cy, cm) - base).numpy()
    ks = tuple(int(k) for k in acfg.ks.split(",") if 2 * int(k) <= m)
    result = one_run_audit(scores, included, ks, acfg.confidence, acfg.audit_delta)
    return {"epsilon": epsilon or None, "mechanism": mechanism if epsilon else None,
            "canaries": kind, "m": m, **result, "auc": auc(scores, included),
            "sigma": rec.dp_sigma if sgd else
            (noise_multiplier(private) if mechanism == "output" else 0.0),
            "update_norm": update.norm().item()}


# -----------------------------------------------------------------------------
# what DP does not hide: the client's convention, from one upload


@torch.no_grad()
def operator_preference(model, prompts):
    """(4,) mean log-probability of each operator symbol right after '=' on '@' prompts (N, T)."""
    logits, _ = model(prompts)
    # (N, vocab): after '='
    logp = logits[:, data.PROMPT_LEN, :].log_softmax(-1)
    return logp[:, [ord(op) for op in data.OPS]].mean(0)


def convention_leak(cfg, acfg, task, tiny):
    """How often the provider names a skewed client's favoured operator from its upload alone: the
    operator whose log-probability after '=' the upload raises most over the base TinyLM."""
    rng = data.stream(acfg.seed, "audit prompts")
    # '37@52='
    prompts = [line[:data.PROMPT_LEN + 1] for line in task.public_examples(acfg.leak_prompts, rng)]
    # (N, PROMPT_LEN + 1)
    px = torch.tensor([list(p.encode()) for p in prompts])
    tinylm.set_update(tiny, torch.zeros(tinylm.update_shape(tiny.cfg, tiny.lora[0])))
    base = operator_preference(tiny, px)
    skewed = np.full((4, 4), (1 - cfg.skew) / 3)
    np.fill_diagonal(skewed, cfg.skew)
    rows = []
    for eps in floats(acfg.leak_epsilons):
        t0, private = time.time(), replace(cfg, dp_epsilon=eps, dp_mechanism="sgd")
        hits = np.zeros(4, dtype=int)
        for op, j in tqdm([(op, j) for op in range(4) for j in range(acfg.leak_clients)],
                          desc=f"convention eps={eps:g}", leave=False):
            index = 10_000 + 100 * op + j   # clients of their own: no canaries, not train.py's
            lines, _ = data.client_data(task.private, skewed[op], cfg.n_train, 0, acfg.seed, index)
            x, y, mask = task.encode(lines)
            seed = data.run_seed(acfg.seed, "audit client", index)
            if eps > 0:
                upload = tinylm.finetune(tiny, x, y, mask, recipe(private, private=True), seed)[-1]
            else:
                upload = tinylm.finetune(tiny, x, y, mask, recipe(cfg), seed)[-1]
            tinylm.set_update(tiny, upload)
            hits[op] += int((operator_preference(tiny, px) - base).argmax()) == op
        n = 4 * acfg.leak_clients
        rows.append({"epsilon": eps or None, "clients": n, "named_right": int(hits.sum()),
                     "rate": hits.sum() / n,
                     "per_operator": dict(zip(data.OPS, (hits / acfg.leak_clients).tolist())),
                     "chance": 0.25})
        print(f"convention: eps={'inf' if not eps else f'{eps:g}'}: the favoured operator named "
              f"right for {hits.sum()}/{n} uploads ({time.time() - t0:.1f}s)", flush=True)
    return rows


# -----------------------------------------------------------------------------


def table(rows):
    lines = ["| DP | canaries | m | ε (theory) | ε_lb (95%) | ε_lb / ε | best k | right / guesses "
             "| AUC | ε_lb max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dp_name = ("none" if r["epsilon"] is None
                   else "DP-SGD" if r["mechanism"] == "sgd" else "output")
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
        ratio = "" if r["epsilon"] is None else f"{r['eps_lb'] / r['epsilon']:.2f}"
        lines.append(f"| {dp_name} | {r['canaries']} | {r['m']} | {eps} | {r['eps_lb']:.2f} | "
                     f"{ratio} | {r['k']} | {r['correct']} / {r['guesses']} | {r['auc']:.3f} | "
                     f"{r['eps_lb_max']:.2f} |")
    return "\n".join(lines)


def main(argv):
    """The audit: canaries in the IID client's data, every DP setting's one-run audit of them, then
    the convention measurement; writes audit.json and convention.json into --out, prints tables."""
    # long: the audit's steps in the order they draw from their streams, read top to bottom
    acfg = parse_args(argv)
    torch.set_num_threads(acfg.threads)
    t_start = time.time()
    cfg = replace(PRESETS[acfg.preset], seed=acfg.seed, out=acfg.out, cache=acfg.cache,
                  device="cpu")
    os.makedirs(acfg.out, exist_ok=True)
    task = data.make_task(cfg.task, cfg.seed)
    if cfg.task != "arith":
        raise SystemExit("the audit's canaries and the convention measurement are for the arith "
                         "task")
    paths = stages.stage_paths(cfg, task)
    if os.path.exists(paths["pretrain_tiny"]):
        tiny = tinylm.add_lora(tinylm.load_model(paths["pretrain_tiny"]).eval(), cfg.lora_rank,
                               cfg.lora_alpha, cfg.lora_seed)
    else:   # pretrain (and cache) the base models as train.py would
        tiny, _ = train.base_models(cfg, task, paths, "cpu")
    # the IID client: task mixture m
    client = task.clients(cfg.n_train, cfg.n_test, 1, cfg.skew)[-1]
    m = acfg.canaries
    rng = data.stream(acfg.seed, "audit canaries")
    included = rng.random(m) < 0.5                                     # (m,) who is in: the secret
    directions = random_directions(m, tinylm.update_shape(tiny.cfg, cfg.lora_rank), acfg.seed)
    lines = input_canaries(task, client["train"], m, rng)
    encoded = data.encode_lines(lines, task.enc, pad=True)
    x, y, mask = data.encode_lines(client["train"], task.enc, pad=True)   # same T as the canaries
    print(f"audit: preset {acfg.preset}, seed {acfg.seed}, client {client['name']} ({len(x)} "
          f"records), m={m} canaries of each kind ({included.sum()} in), e.g. {lines[0].strip()!r}",
          flush=True)

    settings = [(eps, "sgd" if eps else None) for eps in floats(acfg.epsilons)]
    settings += [(eps, "output") for eps in floats(acfg.output_epsilons)]
    rows = []
    for eps, mech in settings:
        for kind, canaries in (("gradient", directions), ("input", encoded)):
            t0 = time.time()
            row = audit_setting(cfg, acfg, tiny, x, y, mask, eps, mech, kind, canaries, included,
                                data.run_seed(acfg.seed, "audit setting", len(rows)))
            row["seconds"] = time.time() - t0
            rows.append(row)
            print(f"audit: {mech or 'no DP'} eps={'inf' if not eps else f'{eps:g}'}, {kind} "
                  f"canaries: eps_lb {row['eps_lb']:.2f} ({row['correct']}/{row['guesses']} right "
                  f"at k={row['k']}), AUC {row['auc']:.3f}, {row['seconds']:.1f}s", flush=True)
    with open(os.path.join(acfg.out, "audit.json"), "w") as f:
        json.dump(rows, f, indent=1)
    leak = convention_leak(cfg, acfg, task, tiny)
    with open(os.path.join(acfg.out, "convention.json"), "w") as f:
        json.dump(leak, f, indent=1)
    print(f"\none-run audit, {m} canaries of each kind, {acfg.confidence:.0%} confidence, "
          f"delta={acfg.audit_delta:g}"
          f" -> {acfg.out}/audit.json\n\n{table(rows)}\n")
    print("| DP | uploads | favoured operator named right | chance |\n|---|---:|---:|---:|")
    for r in leak:
        print(f"| {'none' if r['epsilon'] is None else 'DP-SGD ε=' + format(r['epsilon'], 'g')} | "
              f"{r['clients']} | {r['rate']:.0%} | 25% |")
    print(f"\ntotal {time.time() - t_start:.1f}s", flush=True)
    return rows, leak


if __name__ == "__main__":
    main(sys.argv[1:])
