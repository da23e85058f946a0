"""Command line of the evaluation kit.

    python -m training.eval identity A.png B.png   # cosine identity similarity of two face photos
    python -m training.eval detect DIR             # face-detection rate of the images in DIR
    python -m training.eval pose A.png             # yaw, pitch, roll in degrees
    python -m training.eval fd-id DIR_A DIR_B      # Frechet distance of identity embeddings of two photo sets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.face import FaceInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    identity = commands.add_parser("identity", help="cosine identity similarity of two face photos")
    identity.add_argument("image_a", type=Path)
    identity.add_argument("image_b", type=Path)
    detect = commands.add_parser("detect", help="face-detection rate of the images in a folder")
    detect.add_argument("folder", type=Path)
    pose = commands.add_parser("pose", help="head pose of a face photo")
    pose.add_argument("image", type=Path)
    fd = commands.add_parser("fd-id", help="Frechet distance of identity embeddings between two photo folders")
    fd.add_argument("folder_a", type=Path)
    fd.add_argument("folder_b", type=Path)
    args = parser.parse_args(argv)

    from training.eval import faces, metrics

    try:
        if args.command == "identity":
            embeddings = faces.embed_photos([args.image_a, args.image_b])
            print(f"{metrics.pairwise_cosine(embeddings[:1], embeddings[1:])[0]:.4f}")
        elif args.command == "detect":
            files = faces.image_files(args.folder)
            if not files:
                print(f"no images in {args.folder}", file=sys.stderr)
                return 2
            print(f"{faces.face_detection_rate(files):.4f} ({len(files)} images)")
        elif args.command == "pose":
            head = faces.head_pose(args.image)
            print(f"yaw {head.yaw:.1f} pitch {head.pitch:.1f} roll {head.roll:.1f}")
        else:
            embeddings = [faces.embed_photos(faces.image_files(folder)) for folder in (args.folder_a, args.folder_b)]
            print(f"{metrics.frechet_distance(*embeddings):.4f}")
    except FaceInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
