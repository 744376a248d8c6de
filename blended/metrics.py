"""Scores for finished edits, so an edit can be measured instead of eyeballed.

Each score answers one question a user asks of an inpainting result, for ours or any other node's output:

- **CLIP similarity** (higher = better): does the edited region match the prompt? CLIP sees a square crop
  around the mask with everything outside the mask mid-grey, so a small edit is judged at CLIP's full
  resolution and the background cannot help or hurt. The fair judge is a CLIP other than the guiding one:
  guidance optimises its own CLIP and can fool it.
- **Background MSE / PSNR / LPIPS** (MSE, LPIPS lower = better; PSNR higher = better): was the rest of the
  photo left alone? Computed only where the mask is 0, BrushBench's protocol (masked images, sums divided by
  the kept area). A pixel-exact paste-back gives MSE 0 and PSNR +inf.
- **Seam scores** (lower = better, 0 = the border looks like the input did there): with a perfect background
  the remaining flaw is the border itself. A thin ring across the mask border is scored in the result and in
  the input, and the difference is reported, so edges the photo already had there do not count:
  ``seam_gradient`` is the RMS pixel gradient in the ring (a hard seam adds a jump), ``seam_colour`` the
  mean colour step from the inner to the outer half of the ring (a tint adds a step).
- **Diversity** (higher = more varied): do the results differ, or did all seeds give the same picture? The mean
  pairwise distance of the CLIP embeddings of the edited regions.

Masks follow the pack's rule: any value > 0 is edited, 0 is background. Images are [B,3,H,W] in [0,1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import mask_morphology, regions
from .errors import BlendedInputError
from .image_io import fit_batch, mask_batch_size, prepare_mask, results_per_item
from .prompts import is_blank, parse_prompt
from .rank import EMBED_CHUNK, Progress, chunk_size, chunks

DEFAULT_RING_WIDTH = 2


# ------------------------------------------------------------------------------------------------ inputs


def prepare(results: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor):
    """Check shapes and return (results, reference, edited-region bool mask), all with the results' batch."""
    results, reference, edited = _checked_inputs(results, reference, mask)
    batch = results.shape[0]
    return results, fit_batch(reference, batch, "input image"), fit_batch(edited, batch, "mask")


def _checked_inputs(results: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor):
    """(results, reference, edited-region bool mask [M,1,H,W]): shapes checked, each with its own batch."""
    for name, tensor in (("results", results), ("input image", reference)):
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise BlendedInputError(f"the {name} must be [B,3,H,W] in 0..1, got shape {tuple(tensor.shape)}")
    batch, _, height, width = results.shape
    if reference.shape[-2:] != results.shape[-2:]:
        raise BlendedInputError(f"the input image is {reference.shape[-1]}x{reference.shape[-2]} but the results "
                                f"are {width}x{height}: score results against the image they were made from "
                                "(same size)")
    # At the results' size by the Sampler's rule, so a mask is read the same here as by the edit.
    edited = prepare_mask(mask, height, width, mask_batch_size(mask)) > 0
    results_per_item(reference.shape[0], batch, "input image")
    results_per_item(edited.shape[0], batch, "mask")
    if not bool(edited.flatten(1).any(dim=1).all()):  # every mask item serves some results
        raise BlendedInputError("the mask is empty (all 0) for some result: connect the mask the edit used")
    return results.float(), reference.float(), edited


# ---------------------------------------------------------------------------------------------- background


def background_mse(results: torch.Tensor, reference: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error over the kept (unedited) pixels and channels; NaN where nothing is kept."""
    keep = (~edited).float()
    area = keep.flatten(1).sum(dim=1) * results.shape[1]
    squared = ((results - reference) ** 2 * keep).flatten(1).sum(dim=1)
    return torch.where(area > 0, squared / area.clamp(min=1), torch.full_like(area, float("nan")))


def psnr(mse: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """[B] PSNR in dB for images in 0..``peak``; +inf where the MSE is exactly 0 (a bit-exact background)."""
    mse = mse.double()
    value = 10 * torch.log10(peak ** 2 / mse)
    return torch.where(mse == 0, torch.full_like(value, float("inf")), value)


def background_lpips(lpips_model, results: torch.Tensor, reference: torch.Tensor,
                     edited: torch.Tensor) -> torch.Tensor:
    """[B] LPIPS between the results and the input with the edited region blacked out in both (BrushBench).

    ``lpips_model(x, y)`` takes images in [-1,1] (the ``lpips`` package's convention) and returns one distance
    per image. The images go to the model's device (a module's parameters'), so LPIPS runs where it was put.
    """
    device = _device_of(lpips_model, results.device)
    keep = (~edited).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        out = lpips_model(results.to(device) * keep * 2 - 1, reference.to(device) * keep * 2 - 1)
    return out.reshape(results.shape[0]).float().cpu()


def _device_of(model, default: torch.device) -> torch.device:
    """The device of a module's first parameter; ``default`` for a plain function or a module without any."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else default


# ---------------------------------------------------------------------------------------------- the seam


def border_rings(edited: torch.Tensor, width: int = DEFAULT_RING_WIDTH):
    """(inner, outer) bool [B,1,H,W]: ``width`` pixels just inside and just outside the mask border."""
    if width < 1:
        raise BlendedInputError(f"the seam ring must be at least 1 pixel wide, got {width}")
    region = edited.float()
    inner = edited & ~(mask_morphology.grow_mask(region, -width) > 0)
    outer = (mask_morphology.grow_mask(region, width) > 0) & ~edited
    return inner, outer


def gradient_rms(images: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """[B] RMS of the horizontal and vertical pixel differences whose two pixels both lie in ``ring``."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    in_x = (ring[..., :, 1:] & ring[..., :, :-1]).float()
    in_y = (ring[..., 1:, :] & ring[..., :-1, :]).float()
    total = (dx ** 2 * in_x).flatten(1).sum(dim=1) + (dy ** 2 * in_y).flatten(1).sum(dim=1)
    count = (in_x.flatten(1).sum(dim=1) + in_y.flatten(1).sum(dim=1)) * images.shape[1]
    return torch.sqrt(total / count.clamp(min=1))


def ring_mean(images: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """[B,C] mean colour of the pixels in ``ring``."""
    weight = ring.float()
    return (images * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp(min=1)


def colour_step(images: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """[B,C] mean colour just inside the border minus mean colour just outside it."""
    return ring_mean(images, inner) - ring_mean(images, outer)


def seam_scores(results: torch.Tensor, reference: torch.Tensor, edited: torch.Tensor,
                width: int = DEFAULT_RING_WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] seam_gradient, [B] seam_colour), each 0 when the ring looks as it did in the input.

    The plain definition, on whole images of the results' batch (see :func:`prepare`): :func:`score_edits`
    computes the same numbers inside each ring's box, one result at a time, and the tests hold it to this.

    ``seam_gradient`` = RMS gradient across the border ring in the result minus the same in the input (a hard
    paste seam raises it; a blurred border lowers it). ``seam_colour`` = mean over channels of |colour step
    across the border in the result - the step in the input| (a tint or brightness shift of the edit raises it).
    """
    inner, outer = border_rings(edited, width)
    ring = inner | outer
    gradient = gradient_rms(results, ring) - gradient_rms(reference, ring)
    colour = (colour_step(results, inner, outer) - colour_step(reference, inner, outer)).abs().mean(dim=1)
    return gradient, colour


# ---------------------------------------------------------------------------------------------- CLIP


def masked_views(images: torch.Tensor, edited: torch.Tensor, size: int) -> torch.Tensor:
    """[B,3,size,size] in 0..1: a square crop around each mask, mid-grey outside the mask, resized for CLIP.

    ``edited`` holds one mask per image or one per consecutive group of images (the Sampler's order).
    """
    per_mask = results_per_item(edited.shape[0], images.shape[0], "mask")
    return torch.cat([masked_view(image, edited[index // per_mask], size) for index, image in enumerate(images)])


def masked_view(image: torch.Tensor, region: torch.Tensor, size: int) -> torch.Tensor:
    """[1,3,size,size]: :func:`masked_views` of one [3,H,W] image and its [1,H,W] bool mask."""
    row0, row1, col0, col1 = regions.mask_bounding_box(region[0])
    side = max(row1 - row0, col1 - col0)
    top = row0 - (side - (row1 - row0)) // 2
    left = col0 - (side - (col1 - col0)) // 2
    height, width = image.shape[-2:]
    # The square's part inside the image, greyed outside the mask; the rest of the square is grey padding.
    inside = (slice(max(top, 0), min(top + side, height)), slice(max(left, 0), min(left + side, width)))
    part = image[:, inside[0], inside[1]]
    kept = region[:, inside[0], inside[1]]
    grey = part * kept + 0.5 * (~kept)
    crop = F.pad(grey[None], (max(-left, 0), max(left + side - width, 0), max(-top, 0),
                              max(top + side - height, 0)), value=0.5)
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)


def unit_embeddings(clip, views: torch.Tensor) -> torch.Tensor:
    """[B,D] unit-length CLIP embeddings of [B,3,S,S] 0..1 views."""
    with torch.no_grad():
        embeds = clip.encode_image(clip.normalize(views.to(clip.device)))
    return F.normalize(embeds.float().cpu(), dim=-1)


def view_embeddings(clip, images: torch.Tensor, edited: torch.Tensor, progress: Optional[Progress] = None,
                    chunk: Optional[int] = None) -> torch.Tensor:
    """[B,D] :func:`unit_embeddings` of the :func:`masked_views`, ``chunk`` (:data:`VIEW_CHUNK`) images at a
    time: only one chunk's views are made and on CLIP's device at once, however many results there are (CLIP's
    activations grow with the batch: 256 views through ViT-L/14 at once hold gigabytes). ``progress(done, B)``
    after each chunk, as in :func:`blended.rank.image_embeddings`."""
    per_mask = results_per_item(edited.shape[0], images.shape[0], "mask")
    embeds = []
    for part in chunks(images.shape[0], VIEW_CHUNK if chunk is None else chunk):
        views = torch.cat([masked_view(images[i], edited[i // per_mask], clip.image_size) for i in part])
        embeds.append(unit_embeddings(clip, views))
        if progress is not None:
            progress(part.stop, images.shape[0])
    return torch.cat(embeds)


# Views CLIP embeds at a time (they are at CLIP's size already): as many as CLIP Rank's chunks.
VIEW_CHUNK = EMBED_CHUNK


def clip_similarity(clip, embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """[B] cosine similarity of each image embedding to its prompt (one prompt, or one per image).

    A prompt is read as the Sampler reads its lines: weighted parts (``a red rock | blurry:-0.5``) score the
    weighted sum of their similarities, so a part the edit was steered away from counts against it, as in CLIP
    Rank and the guidance; a plain line is one part of weight 1, its similarity.
    """
    if len(prompts) not in (1, embeds.shape[0]):
        raise BlendedInputError(f"{len(prompts)} prompts for {embeds.shape[0]} images: give one prompt, or one "
                                "per image")
    lines = [parse_prompt(p) for p in prompts]
    if any(line.is_empty for line in lines):
        raise BlendedInputError("CLIP similarity needs a prompt: type the text the edits should match")
    if len(lines) == 1:
        lines = lines * embeds.shape[0]
    text = {}
    with torch.no_grad():
        for part in (part for line in lines for part in line.parts):
            if part.text not in text:
                text[part.text] = F.normalize(clip.text_embedding(part.text).float().cpu()[0], dim=-1)
    return torch.stack([sum((part.weight * (embeds[i] @ text[part.text]) for part in line.parts), torch.tensor(0.0))
                        for i, line in enumerate(lines)])


def pairwise_distances(embeds: torch.Tensor, elements: Optional[int] = None) -> torch.Tensor:
    """[B,B] ``|a - b|^2 / 2`` of unit embeddings: 1 - cosine similarity, and exactly 0 for identical images.

    Computed a block of rows at a time, each row exactly as on its own: the differences of all pairs at once
    would be [B,B,D] (3 GiB for 1024 results of ViT-L/14, 48 GiB for 4096), the blocks hold at most
    ``elements`` (:data:`PAIRWISE_ELEMENTS`) of them, or one row.
    """
    count, dim = embeds.shape
    rows = max(1, (PAIRWISE_ELEMENTS if elements is None else elements) // max(1, count * dim))
    dist = embeds.new_empty(count, count)
    for part in chunks(count, rows):
        diff = embeds[part.start:part.stop, None, :] - embeds[None, :, :]
        dist[part.start:part.stop] = (diff ** 2).sum(dim=-1) / 2
    return dist


# The most pairwise differences held at once (64 MiB in float32): 256 results of a 768-wide CLIP in one block.
PAIRWISE_ELEMENTS = 16 * 1024 * 1024


def diversity(embeds: torch.Tensor) -> tuple[torch.Tensor, float]:
    """([B] mean distance of each image to the others, batch mean over all pairs); NaN for a single image."""
    count = embeds.shape[0]
    if count < 2:
        return torch.full((count,), float("nan")), float("nan")
    dist = pairwise_distances(embeds)
    per_image = dist.sum(dim=1) / (count - 1)
    return per_image, float(dist.sum() / (count * (count - 1)))


def split_prompts(prompt: str, batch: int, inputs: int = 1) -> list[str]:
    """One prompt per line, fitted to the batch in the sampler's order: for each of ``inputs`` input images (its
    results together), each prompt line's results together. One line is every image's, as many lines as images
    one each."""
    # The lines CLIP Guidance counts (parse_prompt_lines): one of only invisible characters is none.
    lines = [" ".join(line.split()) for line in str(prompt).splitlines() if not is_blank(line)]
    if not lines:
        raise BlendedInputError("CLIP similarity needs a prompt: type the text the edits should match")
    if len(lines) == 1 or len(lines) == batch:
        return lines
    per_input = batch // inputs
    if batch % inputs or per_input % len(lines):
        per = f" per input image ({inputs} inputs)" if inputs > 1 else ""
        raise BlendedInputError(f"{len(lines)} prompt lines for {per_input} images{per}: give one prompt, one per "
                                "image, or one per equal group of images (the Sampler's prompt lines)")
    group = per_input // len(lines)
    return [lines[(i % per_input) // group] for i in range(batch)]


# ---------------------------------------------------------------------------------------------- all scores


@dataclass
class EditScores:
    """Per-image scores (lists of floats, NaN = not measured) and the batch diversity."""

    clip_similarity: list = field(default_factory=list)
    background_mse: list = field(default_factory=list)
    background_psnr: list = field(default_factory=list)
    background_lpips: list = field(default_factory=list)
    seam_gradient: list = field(default_factory=list)
    seam_colour: list = field(default_factory=list)
    diversity: list = field(default_factory=list)
    batch_diversity: float = float("nan")

    COLUMNS = (("clip_similarity", "CLIP sim (+)", "{:.4f}"), ("background_psnr", "PSNR dB (+)", "{:.2f}"),
               ("background_mse", "MSE (-)", "{:.3g}"), ("background_lpips", "LPIPS (-)", "{:.4f}"),
               ("seam_gradient", "seam grad (-)", "{:+.4f}"), ("seam_colour", "seam colour (-)", "{:.4f}"),
               ("diversity", "diversity (+)", "{:.4f}"))

    def table(self, names: Optional[Sequence[str]] = None) -> str:
        """A plain-text table, one row per image plus the mean; (+) = higher is better, (-) = lower is better."""
        count = len(self.seam_colour)
        names = list(names) if names is not None else [str(i) for i in range(count)]
        header = ["image"] + [title for _, title, _ in self.COLUMNS]
        rows = []
        for i in range(count):
            rows.append([names[i]] + [_fmt(getattr(self, key)[i], fmt) for key, _, fmt in self.COLUMNS])
        rows.append(["mean"] + [_fmt(_mean(getattr(self, key)), fmt) for key, _, fmt in self.COLUMNS])
        widths = [max(len(str(row[c])) for row in [header] + rows) for c in range(len(header))]
        lines = ["  ".join(str(cell).rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"batch diversity (mean pairwise CLIP distance, higher = more varied): "
                     f"{_fmt(self.batch_diversity, '{:.4f}')}")
        return "\n".join(lines)


def _fmt(value: float, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return fmt.format(value)


def _mean(values: list) -> float:
    """Mean of the measured values; +inf if any is +inf (e.g. PSNR of an exact background)."""
    measured = [v for v in values if v is not None and not math.isnan(v)]
    if not measured:
        return float("nan")
    return float(sum(measured) / len(measured))


def score_edits(results: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, clip=None,
                prompt: Optional[str] = None, lpips_model=None, ring_width: int = DEFAULT_RING_WIDTH,
                progress: Optional[Progress] = None) -> EditScores:
    """Every score for a batch of edits of ``reference`` in ``mask``.

    ``results`` [B,3,H,W] 0..1; ``reference`` [1|B|divisor,3,H,W]; ``mask`` [1|B|divisor,(1,)H,W] (> 0 =
    edited). CLIP similarity needs ``clip`` and ``prompt``, diversity ``clip``; LPIPS needs ``lpips_model``.
    What is not measured stays NaN. ``progress(done, total)`` is told of each result measured by each pass
    (the pixels, LPIPS, CLIP: ``total`` counts a result once per pass), and may raise to stop scoring.
    """
    # The Sampler's inputs: its images, or one picture's masks (it edits a picture once per mask). Between one
    # and one per result, each input has its group of results.
    inputs = reference.shape[0] if reference.shape[0] > 1 else mask_batch_size(mask)
    inputs = inputs if 1 < inputs < results.shape[0] else 1
    results, reference, edited = _checked_inputs(results, reference, mask)
    if ring_width < 1:
        raise BlendedInputError(f"the seam ring must be at least 1 pixel wide, got {ring_width}")
    batch = results.shape[0]
    # One pass for the pixels, one for LPIPS, one for CLIP: the bar counts each result once per pass.
    stage = _Stages(progress, batch * (1 + (lpips_model is not None) + (clip is not None)))
    mse, gradient, colour = _pixel_scores(results, reference, edited, ring_width, stage.next())
    nan = [float("nan")] * batch
    scores = EditScores(background_mse=mse.tolist(), background_psnr=psnr(mse).tolist(),
                        seam_gradient=gradient.tolist(), seam_colour=colour.tolist(),
                        clip_similarity=list(nan), background_lpips=list(nan), diversity=list(nan))
    if lpips_model is not None:
        scores.background_lpips = _chunked_lpips(lpips_model, results, reference, edited, stage.next()).tolist()
    if clip is not None:
        embeds = view_embeddings(clip, results, edited, progress=stage.next())
        if prompt is not None and str(prompt).strip():
            scores.clip_similarity = clip_similarity(clip, embeds, split_prompts(prompt, batch, inputs)).tolist()
        per_image, scores.batch_diversity = diversity(embeds)
        scores.diversity = per_image.tolist()
    return scores


class _Stages:
    """One progress over several passes through the results: each pass's ``(done, count)`` is reported as
    ``(results done in the passes before + done, total)``, so the bar moves once from 0 to the end."""

    def __init__(self, progress: Optional[Progress], total: int):
        self.progress, self.total, self.offset = progress, total, 0

    def next(self) -> Optional[Progress]:
        """The callback for the next pass (None without a progress), which starts where the last one ended."""
        if self.progress is None:
            return None
        offset = self.offset

        def report(done: int, count: int) -> None:
            self.offset = offset + count
            self.progress(offset + done, self.total)
        return report


def _pixel_scores(results: torch.Tensor, reference: torch.Tensor, edited: torch.Tensor, ring_width: int,
                  progress: Optional[Progress]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([B] background MSE, [B] seam gradient, [B] seam colour), one result at a time.

    Each result against its own input and mask (never a copy of them per result), and the seam only inside its
    ring's box, with the input's side of it measured once per input and mask: 64 results of a 4096x4096 photo
    cost their own pixels, not 64 copies of the photo.
    """
    batch = results.shape[0]
    per_reference = results_per_item(reference.shape[0], batch, "input image")
    per_mask = results_per_item(edited.shape[0], batch, "mask")
    mse, gradient, colour = [], [], []
    seams = {}
    for index in range(batch):
        result = results[index:index + 1]
        picture, region = reference[index // per_reference][None], edited[index // per_mask][None]
        mse.append(background_mse(result, picture, region))
        key = (index // per_reference, index // per_mask)
        if key not in seams:
            seams[key] = _input_seam(picture, region, ring_width)
        (row0, row1, col0, col1), inner, outer, ring, input_gradient, input_step = seams[key]
        crop = result[..., row0:row1, col0:col1]
        gradient.append(gradient_rms(crop, ring) - input_gradient)
        colour.append((colour_step(crop, inner, outer) - input_step).abs().mean(dim=1))
        if progress is not None:
            progress(index + 1, batch)
    return torch.cat(mse), torch.cat(gradient), torch.cat(colour)


def _chunked_lpips(lpips_model, results: torch.Tensor, reference: torch.Tensor, edited: torch.Tensor,
                   progress: Optional[Progress]) -> torch.Tensor:
    """[B] :func:`background_lpips`, a few results at a time, each against its own input and mask: fewer the
    larger the images (its activations are many times an image's size), down to one."""
    batch = results.shape[0]
    per_reference = results_per_item(reference.shape[0], batch, "input image")
    per_mask = results_per_item(edited.shape[0], batch, "mask")
    distances = []
    for chunk in chunks(batch, chunk_size(*results.shape[-2:], most=LPIPS_CHUNK, pixels=LPIPS_PIXELS)):
        pictures = reference[[i // per_reference for i in chunk]]
        masks = edited[[i // per_mask for i in chunk]]
        distances.append(background_lpips(lpips_model, results[chunk.start:chunk.stop], pictures, masks))
        if progress is not None:
            progress(chunk.stop, batch)
    return torch.cat(distances)


# Results LPIPS compares at a time (full resolution: its activations are many times an image's size), and the
# most full-size pixels (per channel) at a time: 4 results of 1024x1024; one of 2048x2048 or larger. VGG's
# features at full size, for the result and the input, with their differences: ~8 GiB at 4 MPixel (traced).
LPIPS_CHUNK = 4
LPIPS_PIXELS = 4 * 1024 * 1024


def _input_seam(picture: torch.Tensor, region: torch.Tensor, width: int):
    """The seam ring of one input and mask: (its box, inner, outer and whole ring inside the box, the input's
    gradient RMS and colour step across it), so each result is measured against it inside the box only."""
    inner, outer = border_rings(region, width)
    ring = inner | outer
    # A mask covering the whole picture has no border: an empty ring, whose scores are 0 (one pixel's box).
    row0, row1, col0, col1 = regions.mask_bounding_box(ring) or (0, 1, 0, 1)
    inside = (..., slice(row0, row1), slice(col0, col1))
    inner, outer, ring, crop = inner[inside], outer[inside], ring[inside], picture[inside]
    return ((row0, row1, col0, col1), inner, outer, ring, gradient_rms(crop, ring),
            colour_step(crop, inner, outer))
