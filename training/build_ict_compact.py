"""Build the compact ICT-FaceKit model bundled in `weights/ict_facekit/` from `../shared/data/ict_facekit`.

What is kept (see the model card written next to the weights):
* the skin (face + head and neck), the mouth socket and both eyeballs, each decimated with quadric simplification;
  every kept vertex is an original ICT vertex (the simplified vertices are snapped to the nearest original one),
  so the compact model equals the full model on the kept vertices;
* the leading `--identity-modes` identity PCA modes (scaled by their standard deviation) and all 53 expressions;
* a MediaPipe Face Mesh (478 landmarks) -> compact-mesh surface correspondence (triangle + barycentric weights),
  built by aligning MediaPipe's canonical face mesh to the ICT model (similarity on 8 anatomical points, then a
  non-rigid fit of the ICT identity/expression modes to the canonical mesh) and taking the closest surface points.

Usage: python -m training.build_ict_compact [--data ../shared/data] [--out weights/ict_facekit]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import fast_simplification
import numpy as np
from safetensors.numpy import save_file
from scipy.spatial import cKDTree

ICT_SOURCE = "ICT-VGL/ICT-FaceKit@da5f95a607f5e6b37755b38d3385d7f2853732e5 FaceXModel/"
MEDIAPIPE_SOURCE = "google-ai-edge/mediapipe@85c0cdc7d70653888903c88df45962b764296342 canonical_face_model.obj"

# (name, first vertex, last vertex inclusive, fraction of triangles kept) in the ICT vertex order.
PARTS = (
    ("skin_and_mouth", 0, 13293, 0.30),
    ("eyeball_left", 21451, 23020, 0.16),
    ("eyeball_right", 23021, 24590, 0.16),
)
# Region label per kept triangle; "face" is the skin of ICT's narrow face area (vertices 0-6705).
REGION_NAMES = ("face", "head", "mouth", "eyes")
NARROW_FACE_LAST_VERTEX = 6705
SKIN_LAST_VERTEX = 11247

# MediaPipe index -> Multi-PIE 68 index, anatomical points used for the initial similarity alignment:
# nose tip, chin, eye corners (outer/inner, subject's right then left), mouth corners.
MEDIAPIPE_TO_MULTI_PIE = {1: 30, 152: 8, 33: 36, 133: 39, 362: 42, 263: 45, 61: 48, 291: 54}
# Iris landmarks: centre then 4 ring points, per eye (subject's right eye first), all put on the pupil centre.
MEDIAPIPE_IRISES = {range(468, 473): "eyeball_right", range(473, 478): "eyeball_left"}
NUM_MEDIAPIPE_LANDMARKS = 478


def read_obj_vertices(path: Path) -> np.ndarray:
    """The `v` lines of an OBJ file as float32 [N, 3]."""
    rows = [line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")]
    return np.asarray(rows, dtype=np.float32)


def decimate_part(vertices: np.ndarray, triangles: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Quadric-decimate a triangle set and snap the result onto original vertices.

    Returns triangles [F, 3] indexing the original ICT vertex array; degenerate and duplicate triangles are dropped.
    """
    used = np.unique(triangles)
    local = np.full(used.max() + 1, -1, np.int64)
    local[used] = np.arange(len(used))
    points = vertices[used]
    new_points, new_triangles = fast_simplification.simplify(
        points, local[triangles], target_reduction=1.0 - keep_fraction
    )
    _, nearest = cKDTree(points).query(new_points)
    snapped = used[nearest][new_triangles]
    valid = (snapped[:, 0] != snapped[:, 1]) & (snapped[:, 1] != snapped[:, 2]) & (snapped[:, 0] != snapped[:, 2])
    snapped = snapped[valid]
    _, first = np.unique(np.sort(snapped, axis=1), axis=0, return_index=True)
    return snapped[np.sort(first)]


def closest_points_on_surface(
    vertices: np.ndarray, triangles: np.ndarray, points: np.ndarray, candidates: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of each query point: (points [N, 3], triangle ids [N], barycentrics [N, 3]).

    Candidate triangles are those touching the query's `candidates` nearest vertices; each candidate is solved exactly
    (clamped barycentric projection onto the triangle, after Ericson, Real-Time Collision Detection, 5.1.5).
    """
    vertex_triangles = [[] for _ in range(len(vertices))]
    for t, corners in enumerate(triangles):
        for v in corners:
            vertex_triangles[v].append(t)
    _, near = cKDTree(vertices).query(points, k=candidates)
    best_points = np.zeros_like(points)
    best_ids = np.zeros(len(points), np.int64)
    best_bary = np.zeros((len(points), 3))
    for i, point in enumerate(points):
        ids = np.unique([t for v in near[i] for t in vertex_triangles[v]])
        a, b, c = (vertices[triangles[ids, k]] for k in range(3))
        bary = _closest_barycentric(point, a, b, c)
        projected = bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c
        j = np.argmin(((projected - point) ** 2).sum(1))
        best_points[i], best_ids[i], best_bary[i] = projected[j], ids[j], bary[j]
    return best_points, best_ids, best_bary


def _closest_barycentric(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Barycentrics [T, 3] of the point of each triangle (a, b, c rows) closest to p."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    bp, cp = p - b, p - c
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        out = np.stack([va / denom, vb / denom, vc / denom], 1)  # interior
        edge_ab = d1 / (d1 - d3)
        edge_ac = d2 / (d2 - d6)
        edge_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
    cases = [
        ((d1 <= 0) & (d2 <= 0), lambda: np.stack([np.ones_like(d1), 0 * d1, 0 * d1], 1)),
        ((d3 >= 0) & (d4 <= d3), lambda: np.stack([0 * d1, np.ones_like(d1), 0 * d1], 1)),
        ((d6 >= 0) & (d5 <= d6), lambda: np.stack([0 * d1, 0 * d1, np.ones_like(d1)], 1)),
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), lambda: np.stack([1 - edge_ab, edge_ab, 0 * d1], 1)),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), lambda: np.stack([1 - edge_ac, 0 * d1, edge_ac], 1)),
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), lambda: np.stack([0 * d1, 1 - edge_bc, edge_bc], 1)),
    ]
    decided = np.zeros(len(d1), bool)
    for condition, value in cases:
        take = condition & ~decided
        out[take] = value()[take]
        decided |= take
    return out


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (scale, rotation, translation) minimising |s R source + t - target|^2."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    src, tgt = source - mu_s, target - mu_t
    u, sigma, vt = np.linalg.svd(tgt.T @ src / len(source))
    d = np.eye(3)
    d[2, 2] = np.sign(np.linalg.det(u @ vt))
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(sigma) @ d) / src.var(0).sum())
    return scale, rotation, mu_t - scale * rotation @ mu_s


def fit_model_to_points(
    neutral: np.ndarray,
    basis: np.ndarray,
    triangles: np.ndarray,
    targets: np.ndarray,
    regularisation: float,
    iterations: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-rigid ICP: linear model (neutral + basis @ coeffs) fitted to target points via closest surface points.

    Each round re-aligns the targets with a similarity, finds their closest points on the current surface and solves a
    ridge least-squares problem for the coefficients. Returns (fitted vertices, re-aligned targets).
    """
    coeffs = np.zeros(basis.shape[0])
    aligned = targets
    for _ in range(iterations):
        current = neutral + np.tensordot(coeffs, basis, 1)
        closest, _, _ = closest_points_on_surface(current, triangles, aligned)
        scale, rotation, shift = umeyama(aligned, closest)
        aligned = scale * aligned @ rotation.T + shift
        closest, triangle_ids, bary = closest_points_on_surface(current, triangles, aligned)
        corners = triangles[triangle_ids]  # [N, 3]
        point_basis = np.einsum("nk,mnkd->mnd", bary, basis[:, corners])  # [M, N, 3]
        point_neutral = np.einsum("nk,nkd->nd", bary, neutral[corners])
        a = point_basis.reshape(len(basis), -1).T
        b = (aligned - point_neutral).reshape(-1)
        coeffs = np.linalg.solve(a.T @ a + regularisation * np.eye(len(basis)), a.T @ b)
    return neutral + np.tensordot(coeffs, basis, 1), aligned


def build(data_dir: Path, out_dir: Path, identity_modes: int) -> dict:
    """Write model.safetensors, config.json, README.md and LICENSE to `out_dir`; return the config."""
    ict = np.load(data_dir / "ict_facekit" / "ict_facekit.npz")
    groups = json.loads((data_dir / "ict_facekit" / "ict_vertex_groups.json").read_text())
    neutral_full = ict["neutral_vertices"].astype(np.float64)
    all_triangles = ict["triangles"].astype(np.int64)

    kept_triangles = []
    for _name, first, last, fraction in PARTS:
        inside = ((all_triangles >= first) & (all_triangles <= last)).all(1)
        kept_triangles.append(decimate_part(neutral_full, all_triangles[inside], fraction))
    triangles_full = np.concatenate(kept_triangles)
    source_index = np.unique(triangles_full)
    to_compact = np.full(len(neutral_full), -1, np.int64)
    to_compact[source_index] = np.arange(len(source_index))
    triangles = to_compact[triangles_full]

    skin_max = triangles_full.max(1)
    region = np.where(
        skin_max <= NARROW_FACE_LAST_VERTEX, 0, np.where(skin_max <= SKIN_LAST_VERTEX, 1, 2)
    )
    region[triangles_full.min(1) >= PARTS[1][1]] = 3

    neutral = neutral_full[source_index]
    identity = ict["identity_deltas"][:identity_modes, source_index].astype(np.float64)
    expression = ict["expression_deltas"][:, source_index].astype(np.float64)

    # MediaPipe canonical mesh -> ICT surface correspondence, on the skin triangles only.
    canonical = read_obj_vertices(data_dir / "mediapipe" / "canonical_face_model.obj").astype(np.float64)
    multi_pie = groups["landmarks"]["multi_pie_68"]
    mp_ids = list(MEDIAPIPE_TO_MULTI_PIE)
    anchors = neutral_full[[multi_pie[MEDIAPIPE_TO_MULTI_PIE[i]] for i in mp_ids]]
    scale, rotation, shift = umeyama(canonical[mp_ids], anchors)
    canonical_aligned = scale * canonical @ rotation.T + shift
    skin_triangles = triangles[region <= 1]
    basis = np.concatenate([identity, expression])
    fitted, canonical_aligned = fit_model_to_points(neutral, basis, skin_triangles, canonical_aligned, 30.0)
    closest, triangle_ids, bary = closest_points_on_surface(fitted, skin_triangles, canonical_aligned)
    distance = np.linalg.norm(closest - canonical_aligned, axis=1)
    landmark_triangles = np.zeros((NUM_MEDIAPIPE_LANDMARKS, 3), np.int64)
    landmark_bary = np.zeros((NUM_MEDIAPIPE_LANDMARKS, 3))
    landmark_triangles[:468] = skin_triangles[triangle_ids]
    landmark_bary[:468] = bary

    regions = json.loads((data_dir / "mediapipe" / "face_mesh_regions.json").read_text())["regions"]
    weights = np.ones(NUM_MEDIAPIPE_LANDMARKS)
    weights[regions["FACEMESH_FACE_OVAL"]["indices"]] = 0.5
    weights[468:] = 0.0
    eye_triangles = triangles[region == REGION_NAMES.index("eyes")]
    for mp_indices, part in MEDIAPIPE_IRISES.items():
        side = 1.0 if part == "eyeball_left" else -1.0
        candidates = np.unique(eye_triangles)
        candidates = candidates[np.sign(neutral[candidates, 0]) == side]
        pupil = candidates[np.argmax(neutral[candidates, 2])]  # the pupil centre looks toward +z
        landmark_triangles[mp_indices] = pupil
        landmark_bary[mp_indices] = (1.0, 0.0, 0.0)
        weights[mp_indices.start] = 0.5  # ring points keep weight 0: they sit on the iris edge, not the pupil

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        "neutral": neutral.astype(np.float16),
        "identity_basis": identity.astype(np.float16),
        "expression_basis": expression.astype(np.float16),
        "triangles": triangles.astype(np.int32),
        "triangle_region": region.astype(np.int32),
        "source_vertex_index": source_index.astype(np.int32),
        "landmark_triangles": landmark_triangles.astype(np.int32),
        "landmark_barycentric": landmark_bary.astype(np.float16),
        "landmark_weight": weights.astype(np.float16),
    }
    # fancy indexing can leave arrays non-C-contiguous, and safetensors writes the raw buffer
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model": "ict_facekit_compact",
        "source": ICT_SOURCE,
        "licence": "MIT (LICENSE)",
        "units": "cm",
        "frame": "+x = subject's left (viewer's right), +y up, +z out of the face (the face looks toward +z)",
        "num_vertices": int(len(source_index)),
        "num_triangles": int(len(triangles)),
        "num_identity": identity_modes,
        "identity_scale": "coefficients ~ N(0, 1): modes are scaled by their standard deviation",
        "expression_names": [str(name) for name in ict["expression_names"]],
        "expression_range": [0.0, 1.0],
        "region_names": list(REGION_NAMES),
        "parts": [{"name": n, "vertex_first": a, "vertex_last": b, "triangles_kept": f} for n, a, b, f in PARTS],
        "landmarks": {
            "scheme": "MediaPipe Face Mesh, 478 landmarks (refine_landmarks=True); 0-467 also work alone",
            "source": MEDIAPIPE_SOURCE,
            "alignment_residual_cm": {"mean": float(distance.mean()), "max": float(distance.max())},
            "weights": "1 inner, 0.5 face oval and iris centres, 0 iris ring",
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out_dir / "README.md").write_text(model_card(config))
    shutil.copyfile(data_dir / "ict_facekit" / "LICENSE", out_dir / "LICENSE")
    return config


def model_card(config: dict) -> str:
    """The README.md written next to the weights."""
    residual = config["landmarks"]["alignment_residual_cm"]
    return f"""# ICT-FaceKit compact (3D morphable face model)

A reduced copy of the **ICT Face Model Light** ({ICT_SOURCE}), MIT licence (`LICENSE`, (c) 2020 USC Institute for
Creative Technologies), used at runtime by `core/face3dmm.py`. Built by `python -m training.build_ict_compact` from
`../shared/data/ict_facekit`; the build is deterministic.

## Contents (`model.safetensors`, float16 geometry)

| tensor | shape | meaning |
|---|---|---|
| `neutral` | [{config["num_vertices"]}, 3] | mean shape, cm |
| `identity_basis` | [{config["num_identity"]}, {config["num_vertices"]}, 3] | leading identity PCA modes, scaled by \
their standard deviation (coefficients ~ N(0, 1)) |
| `expression_basis` | [53, {config["num_vertices"]}, 3] | the 53 ARKit-style blendshapes (weights in [0, 1]), \
order in `config.json` |
| `triangles` | [{config["num_triangles"]}, 3] int32 | counter-clockwise seen from outside |
| `triangle_region` | [{config["num_triangles"]}] int32 | index into `region_names` (face = ICT narrow face area) |
| `source_vertex_index` | [{config["num_vertices"]}] int32 | each kept vertex's index in the full ICT model |
| `landmark_triangles`, `landmark_barycentric`, `landmark_weight` | [478, 3], [478, 3], [478] | MediaPipe \
Face Mesh landmark -> surface point, and its fitting weight |

Frame: {config["frame"]}.

## How it was reduced

* Skin (face, head and neck) with the mouth socket, and each eyeball, were decimated with quadric simplification
  (`fast-simplification`), keeping about 30 % (skin) and 16 % (eyeballs) of the triangles. The simplified vertices
  were snapped to the nearest original vertex, so **the compact model equals the full model on its vertices** up to
  float16 rounding. Teeth, gums, tongue, lacrimal fluid, eye blend/occlusion meshes and the 4 extra expressions are
  dropped, as are identity modes {config["num_identity"]}-99.
* Landmark correspondence: MediaPipe's canonical face mesh ({MEDIAPIPE_SOURCE}, Apache-2.0) was aligned to the ICT
  neutral mesh with a similarity on 8 anatomical points (eye corners, nose tip, mouth corners, chin), then the ICT
  identity and expression modes were fitted to it by non-rigid closest-point iterations; each of the 468 landmarks
  maps to its closest point on the fitted skin surface (residual mean {residual["mean"]:.3f} cm, max
  {residual["max"]:.3f} cm). The iris centres (468, 473) map to the pupil vertex of each eyeball; the iris ring points
  (469-472, 474-477) also map there with weight 0. Face-oval landmarks get weight 0.5: they are partly silhouette
  points in photos, which fixed surface points only approximate.

## Limits

The ICT units are most likely centimetres (not stated by ICT). The decimated mesh is faceted compared with the
original 26,719-vertex model. The model has no albedo; renders use grey albedo with coloured SH lighting.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=root / "weights" / "ict_facekit")
    parser.add_argument("--identity-modes", type=int, default=50)
    args = parser.parse_args()
    config = build(args.data, args.out, args.identity_modes)
    size = (args.out / "model.safetensors").stat().st_size
    print(
        f"{config['num_vertices']} vertices, {config['num_triangles']} triangles, {config['num_identity']} identity"
        f" modes, {size / 2**20:.2f} MiB; landmark residual {config['landmarks']['alignment_residual_cm']}"
    )


if __name__ == "__main__":
    main()
