"""Audio stage: decode the movie's sound with PyAV, resample to 24 kHz mono, EnCodec codes per TR.

The 24 kHz EnCodec model emits 75 code frames per second; TR ``i`` takes the ``C = floor(tr * 75)``
frames starting at ``floor(i * tr * 75)`` (112 at TR 1.5 s), the last TR padded by repeating its final
frame if the audio ends early. The number of codebooks comes from the codes' shape.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import StoreError

__all__ = [
    "SAMPLE_RATE",
    "decode_audio",
    "load_encodec",
    "encode_audio",
    "codes_per_tr",
    "init_random_codebooks",
]

SAMPLE_RATE = 24_000
ENCODEC_MODEL = "encodec_24khz"
_KMEANS_MAX = 2048


def decode_audio(
    path: str | Path, rate: int = SAMPLE_RATE, report: dict[str, int] | None = None
) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at ``rate`` Hz, on the container clock.

    A stream that starts late is padded with silence at the front and encoder priming before time
    zero is dropped, so sample ``n`` is at ``n / rate`` seconds of the movie, like the video frames.
    A damaged packet (ffmpeg's decoder rejects it) becomes silence of the packet's duration, so
    later sound keeps its time; ``report["bad_packets"]`` counts them. Changes of sample format,
    channel layout or sample rate mid-stream are followed (``report["format_changes"]``).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise StoreError(path, "audio source not found", dataset="--video")
    chunks: list[np.ndarray] = []
    start: float | None = None
    bad = 0
    changes = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise StoreError(path, "has no audio stream", dataset="--video")
            stream = container.streams.audio[0]
            resampler: Any = None
            source: tuple | None = None
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1
                    if packet.duration and packet.time_base is not None:
                        gap = float(packet.duration * packet.time_base)
                        chunks.append(np.zeros(round(gap * rate), np.float32))
                    continue
                for frame in frames:
                    if start is None and frame.time is not None:
                        start = float(frame.time)
                    # Broadcast streams change layout or rate mid-file (an AAC track going from
                    # mono to stereo); a resampler is fixed to its first frame's format, so each
                    # change flushes the old one and starts a new one, keeping every sample.
                    kind = (frame.format.name, frame.layout.name, frame.sample_rate)
                    if kind != source:
                        if resampler is not None:
                            chunks.extend(_flush(resampler))
                        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
                        source = kind
                        changes += 1
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().reshape(-1))
            if resampler is not None:
                chunks.extend(_flush(resampler))
    except (av.error.FFmpegError, ValueError) as err:  # PyAV raises ValueError for odd frames
        raise StoreError(path, f"audio decoding failed: {err}", dataset="--video") from None
    if report is not None:
        report["bad_packets"] = bad
        report["format_changes"] = max(0, changes - 1)
    if not chunks:
        raise StoreError(path, "audio stream decoded to no samples", dataset="--video")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)  # no second full-length copy
    offset = round((start or 0.0) * rate)
    if offset > 0:
        wave = np.concatenate([np.zeros(offset, np.float32), wave])
    elif offset < 0:
        wave = wave[-offset:]
    return wave


def _flush(resampler: Any) -> list[np.ndarray]:
    return [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]


def load_encodec(
    bandwidth: float, pretrained: bool, weights: str | Path | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """The 24 kHz EnCodec model at ``bandwidth`` kbps, pretrained or with random weights, and the
    record of the weight file used (None without one).

    Pretrained weights come from the package's URL, or from ``weights``: a file (the package's
    ``encodec_24khz-d7cc33bc.th`` copied from a machine with internet, checksum-verified against
    the hash in its name, or any state dict of this network, e.g. a fine-tuned one) or a folder
    holding the package's file. Failing to get them is an error, never a silent fallback.
    """
    import torch
    from encodec import EncodecModel

    from giblet_ds.store.builder import weights as wfiles

    record = None
    try:
        # Fixed seed: a --no-pretrained rebuild with the same settings gives the same codes.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # encodec 0.1.1 uses torch's deprecated weight_norm; nothing for our users to act on.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm")
            torch.manual_seed(0)
            if weights is None:
                model = EncodecModel.encodec_model_24khz(pretrained=pretrained)
            else:
                path = Path(weights)
                if path.is_dir():
                    path = path / wfiles.ENCODEC_CHECKPOINT
                record = wfiles.weight_file_record(
                    path, "--encodec-weights", wfiles.encodec_published_sha256(path)
                )
                state = wfiles.load_state_dict(path, "--encodec-weights")
                model = EncodecModel.encodec_model_24khz(pretrained=False)
                wfiles.load_module_weights(model, state, path, "--encodec-weights")
                model.name = ENCODEC_MODEL
    except StoreError:
        raise
    except Exception as err:  # download (URLError, HTTPError) or checksum failures
        raise StoreError(
            ENCODEC_MODEL,
            f"could not load pretrained EnCodec weights ({type(err).__name__}: {err}); "
            "connect to the internet, pass --encodec-weights FILE (a copy of "
            f"{wfiles.ENCODEC_CHECKPOINT} or a state dict), or build with --no-pretrained "
            "(random weights, recorded in the store)",
        ) from None
    if bandwidth not in model.target_bandwidths:
        raise StoreError(
            ENCODEC_MODEL,
            "unsupported bandwidth",
            expected=f"one of {model.target_bandwidths} kbps",
            actual=bandwidth,
        )
    model.set_target_bandwidth(bandwidth)
    return model.eval(), record


def init_random_codebooks(
    model: Any, wave: np.ndarray, *, max_seconds: float = 30.0, iters: int = 10
) -> None:
    """Give a randomly initialized EnCodec usable codebooks.

    EnCodec's codebooks start as zeros and are set by k-means on the first training batch; an
    untrained model therefore maps every frame to code 0. For ``--no-pretrained`` we run that same
    k-means initialization (``iters`` Lloyd steps on at most 2,048 frames, fixed seed), layer by
    layer on the residuals of the first ``max_seconds`` of this movie, so the codes vary with the
    sound. (The package's own k-means builds an N x 1024 x D difference tensor and takes minutes.)
    """
    import torch

    quantizer = model.quantizer
    n_q = quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, model.bandwidth)
    piece = torch.from_numpy(wave[: int(max_seconds * SAMPLE_RATE)])[None, None]
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        residual = model.encoder(piece)  # (1, D, frames)
        for layer in quantizer.vq.layers[:n_q]:
            vectors = layer.project_in(residual.transpose(1, 2)).reshape(-1, residual.shape[1])
            if len(vectors) > _KMEANS_MAX:
                vectors = vectors[torch.randperm(len(vectors), generator=generator)[:_KMEANS_MAX]]
            codebook = layer._codebook
            centroids = _kmeans(vectors, codebook.codebook_size, iters, generator)
            codebook.embed.copy_(centroids)
            codebook.embed_avg.copy_(centroids)
            codebook.inited.fill_(1.0)
            residual = residual - layer.decode(layer.encode(residual))


def _kmeans(vectors: Any, k: int, iters: int, generator: Any) -> Any:
    import torch

    n = vectors.shape[0]
    if n >= k:
        start = torch.randperm(n, generator=generator)[:k]
    else:
        start = torch.randint(0, n, (k,), generator=generator)
    centroids = vectors[start].clone()
    for _ in range(iters):
        # argmin over centroids of |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change it.
        assign = (centroids.pow(2).sum(1)[None] - 2 * vectors @ centroids.T).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).to(vectors.dtype)
        filled = counts > 0
        # Empty clusters keep their previous centroid.
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def encode_audio(
    wave: np.ndarray,
    model: Any,
    *,
    segment_s: float = 30.0,
    context_s: float = 1.0,
    batch: int | None = None,
    device: str = "cpu",
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """EnCodec codes (n_q, n_frames) of ``wave`` at 75 frames per second.

    Encoded in segments (a whole movie at once needs tens of GB of activations), each with
    ``context_s`` of preceding audio (silence before the start) that is encoded and dropped: the
    24 kHz model is causal, so segment edges see the same past as a whole-file encode up to the
    LSTM's longer memory. Segments run ``batch`` at a time: the encoder's LSTM steps through time
    one frame after another, so batching segments is what keeps a device busy. Default batch: 8
    on a CPU (more gains nothing on a few cores), 32 on a GPU (a 49-minute movie is 99 segments
    of 30 s: four batches; the first conv layer's output alone is 32 x 31 s x 24 kHz x 32
    channels x 4 B = 3 GB, so expect ~9 GB of activations: estimated, not measured here).
    """
    import torch

    if batch is None:
        batch = 8 if str(device).startswith("cpu") else 32

    hop = int(np.prod(model.encoder.ratios))  # samples per code frame (320)
    seg = max(1, round(segment_s * SAMPLE_RATE / hop)) * hop
    ctx = round(context_s * SAMPLE_RATE / hop) * hop
    n_frames = math.ceil(len(wave) / hop)
    n_segments = math.ceil(len(wave) / seg)
    out: list[np.ndarray] = []

    def piece(k: int) -> np.ndarray:
        # Context + segment, zeros before the movie and after its end (the model is causal, so
        # trailing zeros never change earlier codes); cut from the wave, never a padded copy.
        buf = np.zeros(ctx + seg, dtype=np.float32)
        lo, hi = k * seg - ctx, k * seg + seg
        part = wave[max(lo, 0) : min(hi, len(wave))]
        buf[max(lo, 0) - lo : max(lo, 0) - lo + len(part)] = part
        return buf

    model = model.to(device)
    with torch.inference_mode():
        for first in range(0, n_segments, batch):
            indices = range(first, min(first + batch, n_segments))
            pieces = np.stack([piece(k) for k in indices])
            encoded = model.encode(torch.from_numpy(pieces).to(device)[:, None])
            codes = torch.cat([frame_codes for frame_codes, _ in encoded], dim=-1)
            skip = ctx // hop
            for row in codes[:, :, skip : skip + seg // hop].cpu().numpy():
                out.append(row)
            if progress is not None:
                progress(len(indices))
    return np.concatenate(out, axis=1)[:, :n_frames].astype(np.int16)


def codes_per_tr(codes: np.ndarray, tr: float, n_trs: int, frame_rate: float = 75.0) -> np.ndarray:
    """Cut codes (n_q, frames) into (n_trs, n_q, C) with ``C = floor(tr * frame_rate)``;
    TR ``i`` starts at frame ``floor(i * tr * frame_rate)``; a short tail repeats the last frame."""
    per_tr = math.floor(tr * frame_rate + 1e-9)
    n_q, total = codes.shape
    out = np.empty((n_trs, n_q, per_tr), dtype=np.int16)
    for i in range(n_trs):
        start = math.floor(i * tr * frame_rate + 1e-9)
        piece = codes[:, start : start + per_tr]
        if piece.shape[1] < per_tr:
            if total == 0:
                raise StoreError("audio", "no EnCodec frames to pad from")
            last = codes[:, -1:]
            piece = np.concatenate([piece, np.repeat(last, per_tr - piece.shape[1], axis=1)], 1)
        out[i] = piece
    return out
