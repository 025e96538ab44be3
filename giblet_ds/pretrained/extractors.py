"""EnCodec and the CLIP text tower, built by the store builder's own loaders, and proof of which
weights they hold.

A model only means something on features made with the weights it was trained on. The export
records, per extractor, the SHA-256 of the network's tensors as the builder built them
(``state_sha256``); a prediction builds the networks the same way and refuses to go on when a
hash differs (``allow_other_weights`` goes on and records it). With ``--no-pretrained`` stores,
EnCodec's random network gets its codebooks by k-means on the *training* movie's first 30 s: the
export keeps those codebooks, so a new movie is coded with the training movie's codebooks, never
its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from giblet_ds.pretrained.bundle import FeatureWeightsError
from giblet_ds.pretrained.settings import FeatureSettings
from giblet_ds.store.builder import audio, text

__all__ = [
    "Extractors",
    "codebook_tensors",
    "load_codebooks",
    "load_extractors",
    "state_sha256",
    "text_tower_sha256",
    "training_codebooks",
]


def state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: each tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _codebook_prefixes(model: Any) -> list[str]:
    quantizer = model.quantizer
    n_q = quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, model.bandwidth)
    return [f"quantizer.vq.layers.{i}._codebook." for i in range(n_q)]


def codebook_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The codebook tensors ``audio.init_random_codebooks`` sets (the bandwidth's layers)."""
    prefixes = tuple(_codebook_prefixes(model))
    return {
        name: tensor.detach().clone().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(prefixes)
    }


def load_codebooks(model: Any, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Put exported codebooks into a freshly built random EnCodec (every name must fit)."""
    own = model.state_dict()
    expected = set(codebook_tensors(model))
    if set(tensors) != expected or any(own[k].shape != v.shape for k, v in tensors.items()):
        raise FeatureWeightsError(
            f"{source}: codebooks do not fit EnCodec at this bandwidth (expected "
            f"{len(expected)} tensors {sorted(expected)[:3]}..., got {sorted(tensors)[:3]}...); "
            "export the model again"
        )
    model.load_state_dict(tensors, strict=False)


@dataclass
class Extractors:
    """The feature networks of one prediction and what is known of their weights."""

    encodec: Any
    encode_text: Any | None
    """``encode(texts) -> (n, D)``; None when no annotations are given (CLIP is not needed)."""
    hashes: dict[str, str | None]
    """``state_sha256`` per extractor as built now (``clip`` None when not built)."""
    weight_files: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    """Per extractor, what was checked against the export (recorded in every output)."""
    device: str = "cpu"
    """Where the networks run (EnCodec and CLIP; decoding stays on the CPU)."""


def load_extractors(
    settings: FeatureSettings,
    *,
    codebooks: dict[str, torch.Tensor] | None,
    codebooks_path: Path | None = None,
    with_text: bool = True,
    encodec_weights: str | Path | None = None,
    clip_weights: str | Path | None = None,
    allow_other_weights: bool = False,
    device: str = "cpu",
) -> Extractors:
    """Build EnCodec (and the CLIP text tower when ``with_text``) exactly as the store builder
    does for ``settings``, then check their weights against the export's record.

    Raises FeatureWeightsError when a network's ``state_sha256`` or a weight file's SHA-256
    differs from the export's, unless ``allow_other_weights`` (then ``checks`` says so).
    """
    build = settings.builder(device)
    pretrained = bool(build.pretrained)
    if not pretrained and (encodec_weights is not None or clip_weights is not None):
        raise FeatureWeightsError(
            "--encodec-weights/--clip-weights: this model's store was built with random "
            "feature weights (--no-pretrained); its exported codebooks and seed rebuild them, "
            "so no weight file is taken"
        )
    model, encodec_record = audio.load_encodec(build.encodec_bandwidth, pretrained, encodec_weights)
    if not pretrained:
        if codebooks is None:
            raise FeatureWeightsError(
                "the export has no EnCodec codebooks but its store was built with random "
                "weights; export the model again"
            )
        load_codebooks(model, codebooks, codebooks_path or Path("codebooks"))
    encode_text = None
    clip_record = None
    hashes: dict[str, str | None] = {"encodec": state_sha256(model), "clip": None}
    if with_text:
        encode_text, _, _, clip_record = text.load_text_encoder(
            build.clip_model,
            pretrained,
            build.clip_pretrained_tag,
            device,
            weights=clip_weights,
        )
        hashes["clip"] = state_sha256(cast(Any, encode_text).network)
    records = {"encodec": encodec_record, "clip": clip_record}
    checks: dict[str, str] = {}
    problems: list[str] = []
    for role in ("encodec", "clip"):
        if role == "clip" and not with_text:
            checks[role] = "not used: no annotations, the text slots are empty"
            continue
        exported = settings.extractors.get(role, {})
        want_file = settings.weight_files.get(role)
        have_file = records[role]
        flag = f"--{role}-weights"
        if want_file is not None:
            # Pretrained from a file at build time: the file's SHA-256 is the weights' identity.
            got = have_file["sha256"] if have_file else None
            if got != want_file["sha256"]:
                problems.append(
                    f"{role}: the model's features were made with {want_file['name']} (sha256 "
                    f"{want_file['sha256'][:16]}...), got "
                    + (f"{have_file['name']} (sha256 {got[:16]}...)" if have_file and got
                       else f"the package's own weights; pass {flag} {want_file['name']}")
                )  # fmt: skip
                checks[role] = f"DIFFERENT weight file ({have_file and have_file['name']})"
            else:
                checks[role] = f"weight file sha256 matches ({want_file['name']})"
            continue
        want = exported.get("state_sha256")
        have = str(hashes[role])
        if want is None:
            checks[role] = (
                "not checked: the export records no weight hash for these pretrained weights "
                f"(now {have})"
            )
        elif want != have:
            problems.append(
                f"{role}: network weights sha256 {have[:16]}... differ from the "
                f"export's {want[:16]}... ({exported.get('source', '')})"
            )
            checks[role] = f"DIFFERENT weights: sha256 {have}, export {want}"
        else:
            checks[role] = f"weights sha256 matches the export ({want[:16]}...)"
    if problems and not allow_other_weights:
        raise FeatureWeightsError(
            "feature extractor weights differ from the ones this model was trained with, so its "
            "predictions would mean something else: " + "; ".join(problems) + ". Use the same "
            "weights, or pass --allow-other-weights (recorded in the output)"
        )
    if problems:
        checks["allow_other_weights"] = "true: predictions made with other feature weights"
    return Extractors(
        encodec=model,
        encode_text=encode_text,
        hashes=hashes,
        weight_files={k: v for k, v in records.items() if v is not None},
        checks=checks,
        device=device,
    )


def training_codebooks(
    settings: FeatureSettings, training_video: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """For a random-weight store: EnCodec's codebooks as the build made them (k-means on the
    training movie's first 30 s, ``audio.init_random_codebooks``) and the network's hash."""
    build = settings.builder()
    model, _ = audio.load_encodec(build.encodec_bandwidth, False, None)
    audio.init_random_codebooks(model, audio.decode_audio(training_video))
    return codebook_tensors(model), state_sha256(model)


def text_tower_sha256(settings: FeatureSettings) -> str:
    """Hash of the random CLIP text tower the build made (seed 0)."""
    build = settings.builder()
    encode, _, _, _ = text.load_text_encoder(build.clip_model, False, None, "cpu")
    return state_sha256(cast(Any, encode).network)
