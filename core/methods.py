"""The five methods of the suite: titles, papers and the registry models each one uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """One method: its tab key, title, paper and the registry models it runs on."""

    key: str
    title: str
    paper: str
    arxiv: str
    summary: str
    models: tuple[str, ...] = ()

    @property
    def paper_url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


METHODS: tuple[MethodInfo, ...] = (
    MethodInfo(
        key="taxfree",
        title="3DMM-conditioned faces",
        paper="'Tax-free' 3DMM Conditional Face Generation",
        arxiv="2305.13460",
        summary="Control expression, pose and light of a StyleGAN face through 3DMM parameters without losing "
        "image quality.",
    ),
    MethodInfo(
        key="latents2semantics",
        title="Region style editing",
        paper="Latents2Semantics: Leveraging the Latent Space of Generative Models for Localized Style Manipulation "
        "of Face Images",
        arxiv="2312.15037",
        summary="An autoencoder with a spatial structure tensor and a style code edits one region's style "
        "(hair, lips, eyes...) in a single forward pass.",
    ),
    MethodInfo(
        key="stylize3d",
        title="3D head stylization",
        paper="Identity Preserving 3D Head Stylization with Multiview Score Distillation",
        arxiv="2411.13536",
        summary="A PanoHead-style 3D head generator fine-tuned into a style; multi-view renders and meshes.",
    ),
    MethodInfo(
        key="beauty",
        title="Beauty optimization",
        paper="Regression-Guided Strategy to Automated Facial Beauty Optimization",
        arxiv="2501.00811",
        summary="Invert a photo into a GAN and move its latent with CMA-ES to raise a learned beauty score while "
        "keeping identity.",
    ),
    MethodInfo(
        key="agilegan3d",
        title="Few-shot 3D portraits",
        paper="AgileGAN3D: Few-Shot 3D Portrait Stylization by Augmented Transfer Learning",
        arxiv="2303.14297",
        summary="3D portrait stylization of an EG3D-style generator learned from about twenty 2D exemplars.",
    ),
)
