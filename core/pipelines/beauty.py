"""Beauty optimisation (arXiv 2501.00811, docs/methods.md §4): move a face's StyleGAN latent with CMA-ES to raise a
learned beauty score while keeping its identity.

Photo path: `core.face.prepare_face` -> `StyleEncoder` (W+) -> `refine_steps` Adam steps on W+ (pixel L2 +
identity loss; LPIPS is not available offline; 60 by default: the encoder's code alone lost skin tone and
accessories in the 32-px preview). Seed path: z = `np.random.RandomState(seed).randn(1, z_dim)` (the
NVlabs convention) through the mapping network with truncation.

Search space: the top-k principal directions of W (computed once per generator from mapped random z, cached),
in units of their standard deviation, with one coefficient vector per edited layer group (coarse and middle
layers by default): dimension k x groups. CMA-ES (`cma`, seeded through its own `randn`, bounded coordinates and
a bounded step size) maximises

    beauty(G(w + d)) - identity_weight * (1 - cos(id(G(w + d)), id(input))) - latent_weight * mean(a^2)
        - identity_barrier * max(0, |desc(G(w + d)) - desc(input)| - (same_person_distance - identity_margin))

where a are the coefficients and desc the identity network's raw descriptor: the barrier keeps the result inside
the network's same-person distance (0.6), with a margin, whatever the soft identity weight. The reconstruction
(d = 0) is returned when no candidate beats it. Every population is rendered and scored as one batch under
inference mode.
Attractiveness models encode the biases of their raters and data; the numbers here say what this model rewards,
nothing about a person.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import cma
import numpy as np
import torch
import torch.nn.functional as F

from core.nets.encoders import style_layer_groups
from core.provenance import Provenance
from core.weights import Registry, WeightsError

METHOD = "Regression-guided beauty optimization"

BIAS_NOTE = (
    "Attractiveness models encode the biases of their raters and training data (here: MEBeauty ratings). The "
    "scores say what this model rewards, not anything about a person's worth or appearance."
)
# (generator, its photo encoder) registry pairs, preferred first: the 128-px models of the training plan, then the
# 32-px previews trained on a CPU. An encoder only fits the generator it was trained against, hence pairs.
GENERATOR_ENCODER_PAIRS = (("stylegan2-faces128", "style-encoder-faces128"), ("stylegan2-faces32", "style-encoder-faces32"))
PCA_SAMPLES = 10_000
PCA_SEED = 0
# A run's defaults: the tab's sliders, the benchmark and the evaluation all start from these.
DEFAULT_BUDGET = 20  # CMA-ES generations
DEFAULT_POPULATION = 12  # candidates per generation
DEFAULT_IDENTITY_WEIGHT = 2.0
DEFAULT_STRENGTH = 1.0


@dataclass(frozen=True)
class LatentBasis:
    """Principal directions of W: `directions` [k, w_dim] (orthonormal rows) and their standard deviations [k]."""

    directions: torch.Tensor
    stds: torch.Tensor


_BASIS_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, LatentBasis]" = weakref.WeakKeyDictionary()


def available_generator_encoder(registry: Registry) -> tuple[str, str]:
    """The first (generator, encoder) of GENERATOR_ENCODER_PAIRS whose two models are available; WeightsError if none."""
    for pair in GENERATOR_ENCODER_PAIRS:
        if all(registry.is_available(name) for name in pair):
            return pair
    raise WeightsError("No base generator with its photo encoder is registered and available ("
                       + "; ".join(" + ".join(pair) for pair in GENERATOR_ENCODER_PAIRS) + "). Train and register "
                       "them (training/README.md).")
_BASIS_LOCK = threading.Lock()


def principal_directions(generator: torch.nn.Module, count: int, samples: int = PCA_SAMPLES) -> LatentBasis:
    """Top-`count` principal directions of W from `samples` mapped random z (fixed seed), cached per generator."""
    with _BASIS_LOCK:
        cached = _BASIS_CACHE.get(generator)
        if cached is not None and cached.directions.shape[0] >= count:
            return LatentBasis(cached.directions[:count], cached.stds[:count])
    mapping = generator.mapping
    device = mapping.w_avg.device
    z = torch.randn([samples, generator.z_dim], generator=torch.Generator().manual_seed(PCA_SEED)).to(device)
    c = torch.zeros([samples, generator.c_dim], device=device)
    with torch.inference_mode():
        w = mapping(z, c)[:, 0].double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(w.T))
    order = torch.argsort(eigenvalues, descending=True)[:count]
    basis = LatentBasis(eigenvectors[:, order].T.float().contiguous(), eigenvalues[order].clamp_min(0).sqrt().float())
    with _BASIS_LOCK:
        _BASIS_CACHE[generator] = basis
    return basis


@dataclass(frozen=True)
class OptimizerSettings:
    """Fixed choices of the optimisation; the per-call knobs are arguments of `BeautyOptimizer.__call__`."""

    directions: int = 8  # principal directions per edited layer group
    edited_groups: tuple[int, ...] = (0, 1)  # coarse and middle layers (see `style_layer_groups`)
    latent_weight: float = 0.5  # penalty on the mean squared coefficient (in standard deviations)
    max_coefficient: float = 3.0  # coordinate bound, in standard deviations, at strength 1
    sigma0: float = 0.5  # initial step size, in standard deviations, at strength 1
    max_sigma: float = 1.0  # step-size bound, in standard deviations, at strength 1
    truncation_psi: float = 0.7  # seed path
    refine_steps: int = 60  # Adam steps on W+ after the encoder (photo path); 0: the encoder's code alone
    refine_lr: float = 0.03
    refine_identity_weight: float = 0.5
    identity_margin: float = 0.1  # the barrier starts this far inside the identity network's same-person distance
    identity_barrier: float = 50.0  # objective penalty per unit of descriptor distance beyond that
    batch_size: int = 16  # candidates rendered at once


@dataclass(frozen=True)
class GenerationRecord:
    """One CMA-ES generation: the best candidate's objective, beauty score and identity similarity; the mean score."""

    generation: int
    best_objective: float
    best_score: float
    mean_score: float
    best_identity: float


@dataclass
class BeautyResult:
    """Images are H x W x 3 uint8. Scores: primary scorer (`score_*`) and the independent evaluator
    (`evaluator_*`), before = the GAN reconstruction, after = the optimised face."""

    input_image: np.ndarray
    reconstruction: np.ndarray
    optimized: np.ndarray
    score_before: float
    score_after: float
    evaluator_before: float
    evaluator_after: float
    identity_similarity: float  # optimised face vs the input (cosine of the identity embeddings)
    reconstruction_identity: float  # reconstruction vs the input
    identity_distance: float  # optimised face vs the input: raw-descriptor distance
    same_person_distance: float  # the identity network calls a pair the same person below this distance
    history: list[GenerationRecord]
    latent_offset: np.ndarray  # [num_ws, w_dim], added to the reconstruction's W+
    coefficients: np.ndarray  # the best CMA-ES solution (standard deviations along the principal directions)
    evaluations: int
    timings: dict[str, float]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    note: str = BIAS_NOTE
    provenance: Provenance | None = None


ProgressCallback = Callable[[int, int, GenerationRecord], None]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images B x 3 x H x W in [-1, 1] -> B x H x W x 3 uint8."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1.0


class BeautyOptimizer:
    """Photo or seed -> reconstruction -> CMA-ES latent optimisation of a beauty score under an identity penalty.

    Modules: `generator` (StyleGAN2 `mapping` + `synthesis`), `encoder` (aligned crops -> W+; only for photos),
    `scorer` and `evaluator` (aligned crops in [-1, 1] -> B scores), `identity` (`embed_aligned`: crops -> unit
    embeddings). Pass them directly (tests) or load them by registry name with `from_pretrained`.
    """

    def __init__(self, generator, encoder, scorer, evaluator, identity, runtime=None,
                 settings: OptimizerSettings | None = None, model_names: dict[str, str] | None = None):
        from core.runtime import Runtime

        self.runtime = runtime or Runtime("cpu")
        self.generator = generator
        self.encoder = encoder
        self.scorer = scorer
        self.evaluator = evaluator
        self.identity = identity
        self.settings = settings or OptimizerSettings()
        self.model_names = dict(model_names or {})

    @classmethod
    def from_pretrained(cls, generator: str | torch.nn.Module | None = None,
                        encoder: str | torch.nn.Module | None = None,
                        scorer: str = "beauty-regressor", identity: str = "identity-resnet",
                        evaluator: str = "beauty-evaluator", runtime=None,
                        settings: OptimizerSettings | None = None) -> "BeautyOptimizer":
        """Load the five models by registry name through `runtime.get_model` (float32; the generator runs its own
        float16 blocks on CUDA). The scorer reuses the runtime's identity network. Without `generator` and
        `encoder`, the first of GENERATOR_ENCODER_PAIRS that is available; they may instead be modules built from
        exports not registered yet (`training/eval_beauty.py`)."""
        from core.beauty import build_beauty_evaluator, build_beauty_scorer
        from core.identity import IdentityEncoder
        from core.nets import generator_from_config
        from core.nets.encoders import build_style_encoder
        from core.runtime import Runtime

        runtime = runtime or Runtime()
        if generator is None and encoder is None:
            generator, encoder = available_generator_encoder(runtime.registry)
        elif generator is None or encoder is None:
            raise ValueError("give both the generator and its encoder, or neither")
        fp32 = torch.float32

        def build_generator(config, state_dict):
            module = generator_from_config(config)
            module.load_state_dict({k: v.float() for k, v in state_dict.items()})
            return module

        def build_identity(config, state_dict):
            module = IdentityEncoder(config)
            module.load_state_dict({k: v.float() for k, v in state_dict.items()})
            return module

        def model(name_or_module, build):
            if isinstance(name_or_module, torch.nn.Module):
                return name_or_module.to(runtime.device, fp32).eval().requires_grad_(False)
            return runtime.get_model(name_or_module, build, dtype=fp32)

        identity_model = runtime.get_model(identity, build_identity, dtype=fp32)
        names = {"generator": generator, "encoder": encoder, "scorer": scorer, "identity": identity,
                 "evaluator": evaluator}
        return cls(
            generator=model(generator, build_generator),
            encoder=model(encoder, build_style_encoder),
            scorer=runtime.get_model(scorer, lambda c, s: build_beauty_scorer(c, s, identity=identity_model),
                                     dtype=fp32),
            evaluator=runtime.get_model(evaluator, build_beauty_evaluator, dtype=fp32),
            identity=identity_model,
            runtime=runtime,
            settings=settings,
            model_names={role: name for role, name in names.items() if isinstance(name, str)},
        )

    @property
    def device(self) -> torch.device:
        return self.generator.mapping.w_avg.device

    # ---- the two ways in -------------------------------------------------------------------------------------

    def _seed_latent(self, seed: int) -> torch.Tensor:
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, self.generator.z_dim)).float().to(self.device)
        c = torch.zeros([1, self.generator.c_dim], device=self.device)
        return self.runtime.run(lambda _: self.generator.mapping(z, c, truncation_psi=self.settings.truncation_psi),
                                fp16_safe=False, what="the mapping network")

    def _synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        return self.generator.synthesis(ws, noise_mode="const")

    def invert(self, target: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Encoder W+ of an aligned crop, refined by `refine_steps` Adam steps on pixel L2 + identity loss."""
        ws = self.runtime.run(lambda _: self.encoder(target), fp16_safe=False, what="the encoder")
        if self.settings.refine_steps <= 0:
            return ws
        resolution = self.generator.img_resolution
        small = F.interpolate(target, size=(resolution, resolution), mode="bilinear", antialias=True,
                              align_corners=False)

        def refine(_):
            latent = ws.clone().requires_grad_(True)  # clones of inference tensors can be optimised
            reference = F.normalize(anchor, dim=1)
            optimizer = torch.optim.Adam([latent], lr=self.settings.refine_lr)
            for _step in range(self.settings.refine_steps):
                image = self._synthesize(latent)
                similarity = (self.identity.embed_aligned(image) * reference).sum(dim=1)
                loss = F.mse_loss(image, small) + self.settings.refine_identity_weight * (1 - similarity).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return latent.detach()

        return self.runtime.run(refine, fp16_safe=False, what="the latent refinement", grad=True)

    # ---- scoring ---------------------------------------------------------------------------------------------

    def _descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """The identity network's raw descriptors of aligned crops (float32)."""
        return self.identity.descriptor(self.identity.chip_from_aligned(images)).float()

    def _score(self, ws: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images, beauty scores, identity cosines and descriptor distances to `anchor` (a raw descriptor) of a
        batch of W+ codes (inference mode)."""
        unit_anchor = F.normalize(anchor, dim=1)

        def render(_):
            images, scores, similarities, distances = [], [], [], []
            for chunk in ws.split(self.settings.batch_size):
                image = self._synthesize(chunk)
                images.append(image)
                scores.append(self.scorer(image).float())
                descriptor = self._descriptor(image)
                similarities.append((F.normalize(descriptor, dim=1) * unit_anchor).sum(dim=1))
                distances.append((descriptor - anchor).norm(dim=1))
            return tuple(torch.cat(parts) for parts in (images, scores, similarities, distances))

        return self.runtime.run(render, fp16_safe=False, what="the generator and scorers")

    def _evaluate(self, images: torch.Tensor) -> float:
        return float(self.runtime.run(lambda _: self.evaluator(images), fp16_safe=False, what="the evaluator")[0])

    # ---- the call --------------------------------------------------------------------------------------------

    def _revision(self, name: str | None) -> str | None:
        """The registry revision of model `name` (None when unregistered or unpinned)."""
        if name is None or name not in self.runtime.registry.names:
            return None
        return self.runtime.registry.entry(name).revision

    def __call__(self, photo=None, *, seed: int = 0, budget: int = DEFAULT_BUDGET, population: int = DEFAULT_POPULATION,
                 identity_weight: float = DEFAULT_IDENTITY_WEIGHT, strength: float = DEFAULT_STRENGTH,
                 progress: ProgressCallback | None = None) -> BeautyResult:
        """Optimise the face in `photo` (anything `core.face.prepare_face` accepts), or the generator's face for
        `seed` when `photo` is None. `budget` = CMA-ES generations, `population` = candidates per generation,
        `identity_weight` = weight of (1 - identity cosine), `strength` scales how far the latent may move.
        `seed` also seeds CMA-ES. `progress(generation, budget, record)` is called after every generation."""
        if budget < 1 or population < 2:
            raise ValueError("budget must be at least 1 generation and population at least 2")
        if strength <= 0 or identity_weight < 0:
            raise ValueError("strength must be positive and identity_weight non-negative")
        cfg = self.settings
        timings: dict[str, float] = {}
        warnings: list[str] = []
        start = time.perf_counter()
        if photo is None:
            ws = self._seed_latent(seed)
            images = self.runtime.run(lambda _: self._synthesize(ws), fp16_safe=False, what="the generator")
            input_image = to_uint8(images)[0]
            anchor = self.runtime.run(lambda _: self._descriptor(images), fp16_safe=False,
                                      what="the identity network")
        else:
            from core.face import prepare_face

            prepared = prepare_face(photo)
            warnings.extend(prepared.warnings)
            input_image = prepared.image
            target = to_tensor(input_image, self.device)
            anchor = self.runtime.run(lambda _: self._descriptor(target), fp16_safe=False,
                                      what="the identity network")
            ws = self.invert(target, anchor)
        timings["inversion_s"] = time.perf_counter() - start

        reconstruction, score_before, identity_before, distance_before = self._score(ws, anchor)
        same_person_distance = float(self.identity.config["same_person_distance"])
        allowed_distance = same_person_distance - cfg.identity_margin

        def objective_of(scores, similarities, distances, coefficients) -> np.ndarray:
            return (scores - identity_weight * (1 - similarities)
                    - cfg.latent_weight * np.mean(coefficients ** 2, axis=1)
                    - cfg.identity_barrier * np.maximum(0.0, distances - allowed_distance))

        groups = [style_layer_groups(ws.shape[1])[g] for g in cfg.edited_groups]
        basis = principal_directions(self.generator, cfg.directions)
        dimension = cfg.directions * len(groups)

        def offsets(coefficients: np.ndarray) -> torch.Tensor:
            """[P, k x groups] coefficients (standard deviations) -> [P, num_ws, w_dim] W+ offsets."""
            a = torch.from_numpy(np.asarray(coefficients, dtype=np.float32)).to(self.device)
            a = a.view(-1, len(groups), cfg.directions) * basis.stds.to(self.device)
            per_group = a @ basis.directions.to(self.device)  # [P, groups, w_dim]
            delta = torch.zeros([a.shape[0], *ws.shape[1:]], device=self.device)
            for index, (first, stop) in enumerate(groups):
                delta[:, first:stop] = per_group[:, index, None, :]
            return delta

        noise = np.random.RandomState(seed)
        options = {
            "popsize": population, "maxiter": budget, "seed": np.nan, "randn": noise.randn, "verbose": -9,
            "bounds": [-cfg.max_coefficient * strength, cfg.max_coefficient * strength],
            "maxstd": cfg.max_sigma * strength, "tolflatfitness": budget, "tolfun": 0, "tolx": 0,
        }
        strategy = cma.CMAEvolutionStrategy(np.zeros(dimension), cfg.sigma0 * strength, options)
        history: list[GenerationRecord] = []
        # the reconstruction (no offset) is the result unless a candidate beats it
        start_measures = (m.cpu().double().numpy() for m in (score_before, identity_before, distance_before))
        best = (float(objective_of(*start_measures, np.zeros((1, dimension)))[0]), np.zeros(dimension))
        evaluations = 0
        opt_start = time.perf_counter()
        while len(history) < budget and not strategy.stop():
            candidates = strategy.ask()
            _, *measures = self._score(ws + offsets(np.stack(candidates)), anchor)
            scores, similarities, distances = (measure.cpu().double().numpy() for measure in measures)
            objective = objective_of(scores, similarities, distances, np.stack(candidates))
            strategy.tell(candidates, (-objective).tolist())
            evaluations += len(candidates)
            top = int(np.argmax(objective))
            if objective[top] > best[0]:
                best = (float(objective[top]), np.array(candidates[top]))
            record = GenerationRecord(len(history) + 1, float(objective[top]), float(scores[top]),
                                      float(scores.mean()), float(similarities[top]))
            history.append(record)
            if progress is not None:
                progress(record.generation, budget, record)
        timings["optimisation_s"] = time.perf_counter() - opt_start

        offset = offsets(best[1][None])
        optimized, score_after, identity_after, distance_after = self._score(ws + offset, anchor)
        timings["total_s"] = time.perf_counter() - start
        return BeautyResult(
            input_image=input_image,
            reconstruction=to_uint8(reconstruction)[0],
            optimized=to_uint8(optimized)[0],
            score_before=float(score_before[0]),
            score_after=float(score_after[0]),
            evaluator_before=self._evaluate(reconstruction),
            evaluator_after=self._evaluate(optimized),
            identity_similarity=float(identity_after[0]),
            reconstruction_identity=float(identity_before[0]),
            identity_distance=float(distance_after[0]),
            same_person_distance=same_person_distance,
            history=history,
            latent_offset=offset[0].cpu().numpy(),
            coefficients=best[1],
            evaluations=evaluations,
            timings=timings,
            settings={"seed": seed, "budget": budget, "population": population, "identity_weight": identity_weight,
                      "strength": strength, "photo": photo is not None, **self.model_names,
                      **dataclasses.asdict(cfg)},
            warnings=warnings,
            provenance=Provenance(
                METHOD, self.model_names.get("generator", "unregistered generator"),
                self._revision(self.model_names.get("generator")), seed,
                {"photo": photo is not None, "budget": budget, "population": population,
                 "identity_weight": identity_weight, "strength": strength, **self.model_names}),
        )
