"""The official checkpoints of the 3D head stylization paper (arXiv 2411.13536): PanoHead and its stylized copies.

None of them is bundled or pinned in `weights/registry.json`: PanoHead's generator is a network pickle, the paper's
stylized generators are `torch.save(G.state_dict())` files on the authors' Google Drive, and a registry entry needs
the checksums of the converted files, which exist only once a user has converted them. Each `OfficialVariant` says
where its file comes from and gives the three commands that make it usable offline: download, convert
(`python -m core.convert`: pickles are read by its `SafeUnpickler`, which runs no code from them; the app itself
never loads a pickle), register (`python -m core.weights register`). A stylized generator is a full PanoHead whose
config.json names its base (`core.convert --base`); the 3D head pipeline lists it as a style of that base.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

DOWNLOADS = "downloads"
PANOHEAD_REPO = "camenduru/PanoHead"
PANOHEAD_FILE = "easy-khair-180-gpc0.8-trans10-025000.pkl"
PANOHEAD_DRIVE = "https://drive.google.com/drive/folders/1m517-F1NCTGA159dePs5R5qj02svtX1_"
STYLIZED_DRIVE = "https://drive.google.com/drive/folders/1P62hXsuOPbSGEhwFd4RtRWL7nzf44hRD"
OFFICIAL_REPO = "https://github.com/three-bee/3d_head_stylization"
PANOHEAD_LICENCE = "CC BY-NC-SA 4.0 (PanoHead weights, non-commercial research)"
STYLIZED_LICENCE = "CC BY-NC-SA 4.0 (fine-tuned from PanoHead, non-commercial research)"
# The prompts of the stylized generators shown on the paper's project page; the Drive folder's file names are not
# known offline, so each file is saved under the name below.
STYLES = ("joker", "pixar", "zombie", "statue", "werewolf", "sketch")


@dataclass(frozen=True)
class OfficialVariant:
    """One official checkpoint: registry `name`, UI `title`, the file saved under `downloads/`, the `download` step
    (a command, or a comment saying what to fetch by hand), where it comes from (Markdown), licence, description,
    and for a stylized generator the registry name of its `base`."""

    name: str
    title: str
    filename: str
    download: str
    source: str
    licence: str
    description: str
    base: str | None = None

    @property
    def folder(self) -> str:
        return f"weights/{self.name}"

    @property
    def convert_command(self) -> str:
        command = f"python -m core.convert {DOWNLOADS}/{self.filename} {self.folder}"
        if self.base is not None:  # a plain state dict: the constructor kwargs come from the converted base
            command += f" --config weights/{self.base}/config.json --base {self.base}"
        return command + " --half"

    @property
    def register_command(self) -> str:
        return (f"python -m core.weights register {self.folder} --name {self.name} "
                f"--licence {shlex.quote(self.licence)} --description {shlex.quote(self.description)}")

    @property
    def commands(self) -> tuple[str, str, str]:
        return self.download, self.convert_command, self.register_command

    def instructions(self) -> str:
        """Markdown: what to download, the commands, and the licence."""
        needs = f" (convert and register **{self.base}** first)" if self.base else ""
        return (f"**{self.title}** needs a download{needs}. {self.source}\n\n"
                "Run these in the repository root, then restart the app:\n\n"
                "```bash\n" + "\n".join(self.commands) + "\n```\n\n"
                f"`core.convert` reads the file without running any code from it and writes `model.safetensors` + "
                f"`config.json` to `{self.folder}/`; the app never loads the original file. Licence: {self.licence}.")


PANOHEAD = OfficialVariant(
    name="panohead-ffhq-official",
    title="PanoHead (official, 512 px)",
    filename=PANOHEAD_FILE,
    download=f"hf download {PANOHEAD_REPO} {PANOHEAD_FILE} --local-dir {DOWNLOADS}",
    source=(f"The released PanoHead generator `{PANOHEAD_FILE}` (SizheAn/PanoHead), from the Hub mirror "
            f"[{PANOHEAD_REPO}](https://huggingface.co/{PANOHEAD_REPO}) or PanoHead's "
            f"[Google Drive]({PANOHEAD_DRIVE}) `models/` folder (save it in `{DOWNLOADS}/`)."),
    licence=PANOHEAD_LICENCE,
    description=f"PanoHead 360-degree head generator (SizheAn/PanoHead {PANOHEAD_FILE})",
)

STYLIZED = tuple(
    OfficialVariant(
        name=f"{PANOHEAD.name}-{style}",
        title=f"{style.capitalize()} (official)",
        filename=f"{PANOHEAD.name}-{style}.pth",
        download=f"# save the '{style}' generator (.pth) of {STYLIZED_DRIVE} as "
                 f"{DOWNLOADS}/{PANOHEAD.name}-{style}.pth",
        source=(f"The paper's stylized PanoHead for the '{style}' prompt, a state dict from the authors' "
                f"[Google Drive folder]({STYLIZED_DRIVE}) (linked from the checkpoint section of "
                f"[three-bee/3d_head_stylization]({OFFICIAL_REPO}); their code is Apache-2.0, the weights derive "
                "from PanoHead's)."),
        licence=STYLIZED_LICENCE,
        description=f"PanoHead stylized for the {style} prompt (arXiv 2411.13536, three-bee/3d_head_stylization)",
        base=PANOHEAD.name,
    )
    for style in STYLES
)

VARIANTS: dict[str, OfficialVariant] = {variant.name: variant for variant in (PANOHEAD, *STYLIZED)}


def stylized_variants(base: str) -> tuple[OfficialVariant, ...]:
    """The official stylized generators fine-tuned from the registry model `base`."""
    return tuple(variant for variant in STYLIZED if variant.base == base)
