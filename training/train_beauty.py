"""Train the beauty-optimisation tab's two scorers on MEBeauty and write their bundles and model cards.

    python -m training.train_beauty --data datasets/faces --out weights

1. Features (cached in `datasets/faces/beauty_features.npz`, git-ignored): the identity network's raw 128-d
   descriptor of every scored MEBeauty 256-px crop and of its mirror; the 128-px crops resized to 64 px.
2. The official MEBeauty train split is halved, per gender/ethnicity group, by the sha256 of the sample name:
   half A trains the regressor (`beauty-regressor`), half B the evaluator (`beauty-evaluator`).
3. Hyper-parameters are chosen on the val split (Pearson r); the test split is only used for the reported metrics.
4. Writes `<out>/beauty_regressor/` and `<out>/beauty_evaluator/`: float16 `model.safetensors`, `config.json`
   (with the hashed names of the training photos) and `README.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy import stats

from core.beauty import BeautyEvaluator, BeautyHead, build_beauty_evaluator, load_identity_encoder
from training.data.archive import archive_path, load_archive

REPO = Path(__file__).resolve().parents[1]
EVALUATOR_SIZE = 64
RIDGE_ALPHAS = (0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
MLP_SETTINGS = ((64, 1e-3), (64, 1e-2), (256, 1e-2), (256, 1e-1))
EVALUATOR_SETTINGS = ((1e-3, 1e-4), (3e-3, 1e-3))
BIAS_NOTE = (
    "**Bias.** Attractiveness is not a property of a face. This model reproduces the mean taste of MEBeauty's "
    "raters for MEBeauty's photos (adult faces, six ethnicity folders, web and stock photography), including their "
    "cultural, gender and ethnic preferences and the photos' make-up, lighting and quality. The per-group errors "
    "below show where it is less reliable. Use it only as a research signal for the optimisation demo; never to "
    "judge, rank or select people."
)


def name_hash(name: str) -> str:
    """First 12 hex digits of the sha256 of a sample name (how training photos are listed in the configs)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def split_halves(names: list[str], groups: np.ndarray) -> np.ndarray:
    """0/1 half per sample: within each group, samples sorted by `name_hash` alternate between the halves."""
    half = np.zeros(len(names), np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        order = members[np.argsort([name_hash(names[i]) for i in members], kind="stable")]
        half[order[1::2]] = 1
    return half


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-d arrays."""
    return float(np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1])


def regression_metrics(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Pearson r, Spearman rho, MAE and RMSE of predictions against targets."""
    error = np.asarray(predicted, np.float64) - np.asarray(target, np.float64)
    return {
        "pearson_r": pearson(predicted, target),
        "spearman_rho": float(stats.spearmanr(predicted, target).statistic),
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
    }


def fit_ridge(features: np.ndarray, targets: np.ndarray, alpha: float) -> dict[str, torch.Tensor]:
    """Closed-form ridge on standardised features; a `BeautyHead` (hidden = 0) state dict."""
    x = np.asarray(features, np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / scale
    y = np.asarray(targets, np.float64)
    weights = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return {
        "feature_mean": torch.tensor(mean, dtype=torch.float32),
        "feature_scale": torch.tensor(scale, dtype=torch.float32),
        "out.weight": torch.tensor(weights[None], dtype=torch.float32),
        "out.bias": torch.tensor([y.mean()], dtype=torch.float32),
    }


def fit_mlp(features: np.ndarray, targets: np.ndarray, hidden: int, weight_decay: float, epochs: int = 300,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """A `BeautyHead` with one hidden layer, full-batch AdamW on the squared error; its state dict."""
    torch.manual_seed(seed)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(targets, dtype=torch.float32)
    head = BeautyHead(x.shape[1], hidden)
    head.feature_mean.copy_(x.mean(0))
    head.feature_scale.copy_(x.std(0) + 1e-8)
    with torch.no_grad():
        head.out.bias.fill_(float(y.mean()))
    optimiser = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = F.mse_loss(head(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def head_predict(state: dict[str, torch.Tensor], features: np.ndarray) -> np.ndarray:
    """Unclamped predictions of a `BeautyHead` state dict on N x D features."""
    hidden = state["hidden.weight"].shape[0] if "hidden.weight" in state else 0
    head = BeautyHead(features.shape[1], hidden)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        return head(torch.tensor(features, dtype=torch.float32)).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Features


def compute_features(data_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """Per scored MEBeauty sample: name, split, group, beauty, identity descriptors (plain, mirrored) and the 64-px
    crop (uint8); cached in `cache`."""
    big = load_archive(archive_path(data_dir, 256))
    small = load_archive(archive_path(data_dir, 128))
    if big.names != small.names:
        raise ValueError("the 128-px and 256-px archives list different samples; rebuild them")
    mebeauty = big.metadata["sources"].index("mebeauty")
    keep = np.flatnonzero((big.source == mebeauty) & np.isfinite(big.beauty))
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            cached = {key: data[key] for key in data.files}
        if list(cached["name"]) == [big.names[i] for i in keep] and np.array_equal(cached["beauty"], big.beauty[keep]):
            return cached
        print(f"{cache} is stale (the archive changed); recomputing", flush=True)
    encoder = load_identity_encoder("identity-resnet")
    descriptors, mirrored, crops = [], [], []
    started = time.time()
    for start in range(0, len(keep), 32):
        batch = keep[start : start + 32]
        images = torch.from_numpy(np.stack([big.image(i) for i in batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        small_images = torch.from_numpy(np.stack([small.image(i) for i in batch])).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            descriptors.append(encoder.descriptor(encoder.chip_from_aligned(images)).numpy())
            mirrored.append(encoder.descriptor(encoder.chip_from_aligned(images.flip(-1))).numpy())
            resized = F.interpolate(small_images, size=(EVALUATOR_SIZE,) * 2, mode="bilinear", antialias=True,
                                    align_corners=False)
        crops.append(resized.round().clamp(0, 255).to(torch.uint8).numpy())
        print(f"features {start + len(batch)}/{len(keep)} ({time.time() - started:.0f} s)", flush=True)
    features = {
        "name": np.array([big.names[i] for i in keep]),
        "split": np.array([big.metadata["splits"][big.split[i]] for i in keep]),
        "group": np.array([big.metadata["groups"][big.group[i]] for i in keep]),
        "beauty": big.beauty[keep].astype(np.float32),
        "descriptor": np.concatenate(descriptors).astype(np.float32),
        "descriptor_mirrored": np.concatenate(mirrored).astype(np.float32),
        "crop64": np.concatenate(crops),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **features)
    return features


# ---------------------------------------------------------------------------------------------------------------------
# Models


def train_regressor(features: dict, train: np.ndarray, val: np.ndarray) -> tuple[dict, dict, list[dict]]:
    """Select ridge alpha or MLP setting on val; fit on `train` (both orientations). (state, head config, trials)."""
    x_train = np.concatenate([features["descriptor"][train], features["descriptor_mirrored"][train]])
    y_train = np.concatenate([features["beauty"][train]] * 2)
    x_val, y_val = features["descriptor"][val], features["beauty"][val]
    trials = []
    for alpha in RIDGE_ALPHAS:
        state = fit_ridge(x_train, y_train, alpha)
        trials.append({"head": "ridge", "alpha": alpha, "hidden": 0, "state": state,
                       "val": regression_metrics(head_predict(state, x_val), y_val)})
    for hidden, weight_decay in MLP_SETTINGS:
        state = fit_mlp(x_train, y_train, hidden, weight_decay)
        trials.append({"head": "mlp", "hidden": hidden, "weight_decay": weight_decay, "state": state,
                       "val": regression_metrics(head_predict(state, x_val), y_val)})
    best = max(trials, key=lambda t: t["val"]["pearson_r"])
    report = [{k: v for k, v in t.items() if k != "state"} for t in trials]
    return best["state"], {k: v for k, v in best.items() if k not in ("state", "val")}, report


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random mirror, +-3 px shift and brightness/contrast jitter of uint8-valued float crops in [-1, 1]."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    dx, dy = torch.randint(-3, 4, (2,), generator=generator).tolist()
    images = torch.roll(F.pad(images, (3, 3, 3, 3), mode="replicate"), (dy, dx), (2, 3))[..., 3:-3, 3:-3]
    gain = 1 + 0.1 * (torch.rand(len(images), 1, 1, 1, generator=generator) * 2 - 1)
    shift = 0.1 * (torch.rand(len(images), 1, 1, 1, generator=generator) * 2 - 1)
    return (images * gain + shift).clamp(-1, 1)


def fit_evaluator(config: dict, images: torch.Tensor, targets: torch.Tensor, val_images: torch.Tensor,
                  val_targets: np.ndarray, lr: float, weight_decay: float, epochs: int, seed: int = 0):
    """Train a `BeautyEvaluator`; returns (best-on-val state dict, best epoch, best val metrics)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = BeautyEvaluator(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=epochs * ((len(images) + 31) // 32))
    best = (None, 0, {"pearson_r": -1.0})
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            if len(batch) < 2:
                continue
            loss = F.smooth_l1_loss(model.raw(_augment(images[batch], generator)), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        metrics = regression_metrics(predict_evaluator(model, val_images), val_targets)
        print(f"  evaluator lr {lr} wd {weight_decay} epoch {epoch}: val r {metrics['pearson_r']:.3f}", flush=True)
        if metrics["pearson_r"] > best[2]["pearson_r"]:
            best = ({k: v.detach().clone() for k, v in model.state_dict().items()}, epoch, metrics)
    return best


def predict_evaluator(model: BeautyEvaluator, images: torch.Tensor) -> np.ndarray:
    """Clamped evaluator scores of N x 3 x 64 x 64 crops in [-1, 1], in batches."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i : i + 128]) for i in range(0, len(images), 128)]).numpy()


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float in [-1, 1]."""
    return torch.from_numpy(crops).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Report


def per_group_table(predicted: np.ndarray, target: np.ndarray, groups: np.ndarray) -> list[dict]:
    """Per group: count, MAE, mean rating, mean prediction (mean signed error = bias towards the group)."""
    rows = []
    for group in sorted(set(groups)):
        mask = groups == group
        rows.append({"group": str(group), "count": int(mask.sum()),
                     "mae": float(np.abs(predicted[mask] - target[mask]).mean()),
                     "mean_rating": float(target[mask].mean()), "mean_prediction": float(predicted[mask].mean())})
    return rows


def _metrics_lines(title: str, metrics: dict, count: int) -> list[str]:
    return [f"| {title} | {count} | {metrics['pearson_r']:.3f} | {metrics['spearman_rho']:.3f} | "
            f"{metrics['mae']:.3f} | {metrics['rmse']:.3f} |"]


def model_card(title: str, summary: str, recipe: list[str], results: dict, config: dict) -> str:
    """Markdown model card: data, split, recipe, measured metrics, per-group errors, bias note, licence."""
    lines = [f"# {title}", "", summary, "", BIAS_NOTE, "",
             "| | |", "|---|---|",
             "| Licence | **Non-commercial research only** (trained on MEBeauty, whose licence allows non-commercial "
             "research use only). Not for release without a licence check. |",
             "| Data | MEBeauty (Lebedeva, Guo, Ying 2021): mean generic attractiveness rating, 1-10, of "
             "FFHQ-aligned crops from `training.data.build_dataset` (dedup'd; see `training/data/DATASET.md`) |",
             f"| Training photos | {config['training_subset']['count']} of the official MEBeauty train split "
             f"(`{config['training_subset']['rule']}`); their name hashes are in `config.json` |",
             f"| Model selection | official val split ({results['counts']['val']} photos), Pearson r |",
             f"| Test | official test split ({results['counts']['test']} photos), never used for fitting or selection |",
             "| Built by | `python -m training.train_beauty --data datasets/faces --out weights` |", "",
             "## Recipe", "", *[f"* {line}" for line in recipe], "",
             "## Measured (float16 weights, float32 compute, CPU)", "",
             "| split | photos | Pearson r | Spearman rho | MAE | RMSE |", "|---|---|---|---|---|---|"]
    for split in ("train", "val", "test"):
        lines += _metrics_lines(split, results[split], results["counts"][split])
    lines += ["", f"Baseline (predict the training mean): test MAE {results['baseline_mae']:.3f}.", "",
              f"Agreement with the other scorer on the test split: Pearson r {results['scorer_agreement']:.3f}.", "",
              "## Per-group error on the test split", "",
              "MEBeauty's gender/ethnicity folders. Mean prediction minus mean rating shows a group-level bias.", "",
              "| group | photos | MAE | mean rating | mean prediction | difference |", "|---|---|---|---|---|---|"]
    for row in results["groups"]:
        lines.append(f"| {row['group']} | {row['count']} | {row['mae']:.3f} | {row['mean_rating']:.2f} | "
                     f"{row['mean_prediction']:.2f} | {row['mean_prediction'] - row['mean_rating']:+.2f} |")
    lines += ["", "## Limitations", "",
              "* MEBeauty has no person ids: its official split (kept here) may put photos of one person in several "
              "splits, and the two training halves may share a person photographed twice; test numbers may be "
              "slightly optimistic.",
              f"* Trained on {config['training_subset']['count']} photos; scores of generated, edited or out-of-distribution faces (children, "
              "profile views, heavy make-up or filters) are extrapolations.",
              "* Scores are clamped to 1-10."]
    return "\n".join(lines) + "\n"


def write_bundle(folder: Path, state: dict[str, torch.Tensor], config: dict, card: str) -> None:
    """model.safetensors (float16), config.json and README.md."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "README.md").write_text(card)


def _float16_roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float16) for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="datasets/faces", help="folder with faces128.npz and faces256.npz")
    parser.add_argument("--out", default="weights", help="writes <out>/beauty_regressor and <out>/beauty_evaluator")
    parser.add_argument("--evaluator-epochs", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()

    features = compute_features(Path(args.data), Path(args.data) / "beauty_features.npz")
    names = [str(n) for n in features["name"]]
    split, groups, beauty = features["split"], features["group"], features["beauty"]
    halves = split_halves(names, groups)
    train_a = np.flatnonzero((split == "train") & (halves == 0))
    train_b = np.flatnonzero((split == "train") & (halves == 1))
    val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
    print(f"train halves {len(train_a)} / {len(train_b)}, val {len(val)}, test {len(test)}", flush=True)
    counts = {"val": len(val), "test": len(test)}

    def subset(index: np.ndarray, half: str) -> dict:
        return {"source": "mebeauty", "split": "train", "half": half,
                "rule": "per group, sorted by sha256(name), alternate samples: A even, B odd positions",
                "count": int(len(index)), "names_sha256_12": sorted(name_hash(names[i]) for i in index)}

    # Regressor: identity descriptor -> head, on half A.
    head_state, choice, trials = train_regressor(features, train_a, val)
    regressor_config = {"architecture": "beauty_regressor", "identity_model": "identity-resnet",
                        "feature": "identity descriptor (raw 128-d) of the dlib chip in the FFHQ crop",
                        "feature_dim": 128, "hidden": choice["hidden"], "score_range": [1.0, 10.0],
                        "selection": choice, "training_subset": subset(train_a, "A")}
    head_state = _float16_roundtrip(head_state)
    regressor_scores = np.clip(head_predict(head_state, features["descriptor"]), 1.0, 10.0)

    # Evaluator: small CNN on 64-px crops, on half B.
    images = to_tensor(features["crop64"])
    evaluator_base = {"architecture": "beauty_evaluator_cnn", "input_size": EVALUATOR_SIZE,
                      "channels": [16, 32, 64, 96], "dropout": 0.3, "score_range": [1.0, 10.0],
                      "score_mean": float(beauty[train_b].mean()), "score_std": float(beauty[train_b].std())}
    runs = []
    for lr, weight_decay in EVALUATOR_SETTINGS:
        state, epoch, metrics = fit_evaluator(evaluator_base, images[train_b], torch.from_numpy(beauty[train_b]),
                                              images[val], beauty[val], lr, weight_decay, args.evaluator_epochs)
        runs.append({"lr": lr, "weight_decay": weight_decay, "best_epoch": epoch, "val": metrics, "state": state})
    best_run = max(runs, key=lambda r: r["val"]["pearson_r"])
    evaluator_config = {**evaluator_base,
                        "selection": {"lr": best_run["lr"], "weight_decay": best_run["weight_decay"],
                                      "epochs": args.evaluator_epochs, "best_epoch": best_run["best_epoch"]},
                        "training_subset": subset(train_b, "B")}
    evaluator = build_beauty_evaluator(evaluator_config, _float16_roundtrip(best_run["state"]))
    evaluator_scores = predict_evaluator(evaluator, images)

    agreement = pearson(regressor_scores[test], evaluator_scores[test])
    results = {}
    for label, scores, train_index in (("regressor", regressor_scores, train_a), ("evaluator", evaluator_scores, train_b)):
        results[label] = {
            "train": regression_metrics(scores[train_index], beauty[train_index]),
            "val": regression_metrics(scores[val], beauty[val]),
            "test": regression_metrics(scores[test], beauty[test]),
            "counts": {**counts, "train": len(train_index)},
            "baseline_mae": float(np.abs(beauty[test] - beauty[train_index].mean()).mean()),
            "scorer_agreement": agreement,
            "groups": per_group_table(scores[test], beauty[test], groups[test]),
        }
    regressor_config["metrics"] = {k: results["regressor"][k] for k in ("val", "test")}
    evaluator_config["metrics"] = {k: results["evaluator"][k] for k in ("val", "test")}
    regressor_config["metrics"]["test_agreement_with_evaluator"] = agreement
    evaluator_config["metrics"]["test_agreement_with_regressor"] = agreement

    head_kind = (f"ridge regression (alpha {choice['alpha']})" if choice["head"] == "ridge"
                 else f"2-layer MLP (hidden {choice['hidden']}, ReLU, AdamW weight decay {choice['weight_decay']})")
    out = Path(args.out)
    write_bundle(out / "beauty_regressor", head_state, regressor_config, model_card(
        "beauty_regressor: MEBeauty attractiveness head on the identity network",
        "The beauty-optimisation tab's objective (`core.beauty.BeautyScorer`, registry `beauty-regressor`): "
        f"{head_kind} on the raw 128-d descriptor of the identity network (`identity-resnet`, not included in this "
        "file; `build_beauty_scorer` loads it from the registry). Input: FFHQ-aligned crops in [-1, 1]; "
        "differentiable from the score back to the pixels.",
        ["Features: `IdentityEncoder.descriptor(chip_from_aligned(crop))` of the 256-px crop and of its mirror "
         "(the mirror as extra training samples; one orientation at inference).",
         "Features standardised with the training mean and standard deviation (stored as buffers).",
         f"Candidates on val: ridge alpha in {list(RIDGE_ALPHAS)}; MLP (hidden, weight decay) in "
         f"{[list(s) for s in MLP_SETTINGS]}, 300 full-batch AdamW steps, lr 3e-3. Chosen: {head_kind}.",
         "Val Pearson r of each candidate: " + ", ".join(
             f"{t['head']} {t.get('alpha', t['hidden'])}{'' if t['head'] == 'ridge' else '/' + str(t['weight_decay'])}"
             f": {t['val']['pearson_r']:.3f}" for t in trials) + "."],
        results["regressor"], regressor_config))
    write_bundle(out / "beauty_evaluator", best_run["state"], evaluator_config, model_card(
        "beauty_evaluator: independent MEBeauty attractiveness CNN (evaluation only)",
        "An independent check for the beauty optimiser (`core.beauty.BeautyEvaluator`, registry `beauty-evaluator`): "
        "a small CNN trained from scratch on the whole aligned crop at 64 px, on the half of the MEBeauty train split "
        "that the regressor did not see. It shares no features, weights or training photos with `beauty-regressor`, "
        "so a score gain that it does not confirm is the optimiser exploiting the regressor. Not an objective.",
        [f"Input: the FFHQ-aligned crop resized to {EVALUATOR_SIZE} px (antialiased bilinear), in [-1, 1].",
         f"Network: 4 stages of two 3x3 conv + batch norm + ReLU and a 2x2 max pool (channels "
         f"{evaluator_base['channels']}), global average pool, dropout {evaluator_base['dropout']}, linear; output = "
         "training mean + training std x network output.",
         "Training: smooth-L1 loss, AdamW, one-cycle schedule, batch 32, random mirror, +-3 px shift, +-10 % "
         f"brightness/contrast; {args.evaluator_epochs} epochs; the epoch with the best val Pearson r is kept.",
         "Candidates on val (lr, weight decay): " + ", ".join(
             f"({r['lr']}, {r['weight_decay']}): r {r['val']['pearson_r']:.3f} at epoch {r['best_epoch']}"
             for r in runs) + "."],
        results["evaluator"], evaluator_config))
    print(json.dumps({"regressor": results["regressor"]["test"], "evaluator": results["evaluator"]["test"],
                      "agreement": agreement, "seconds": round(time.time() - started)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
