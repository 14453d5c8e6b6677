"""The demo data set: tweet-like posts whose entity types only the image can settle.

The generator writes ``train.txt``, ``valid.txt`` and ``test.txt`` in the Twitter
format, one 224x224 JPEG per post under ``images/`` (named by the post's numeric id,
as in Twitter-2015), a ``scenes.tsv`` saying what each image shows, and the resolved
config. Everything follows from the ``demo`` section of ``params.yaml``: the same seed
gives byte-identical files.

What makes it a test of the visual pathway:

- **Ambiguous mentions.** About half of the entity mentions use a name that is a
  person in one post and a place, an organization or something else in another
  ("Jordan", "Phoenix", "Chelsea"). Within each split every ambiguous name takes each
  of its types equally often, always inside the same neutral templates, so the text
  (words, position, hashtags, the other entities) says nothing about the type.
- **The image decides.** A post with an ambiguous mention shows a scene of that type,
  drawn from global colour and layout that even a randomly initialised CNN keeps
  apart: PER warm red/skin tones with a large head-over-body figure; LOC a blue sky
  band over green or brown ground; ORG a grey background with a bold yellow/black
  square logo grid; MISC purple with diagonal stripes. Position, scale, colours,
  clutter and pixel noise are jittered, so no two images are alike.
- **Realistic nuisances.** Some posts without an ambiguous mention get an unrelated
  image (desaturated noise), and a few referenced images are never written, as in the
  real data where images went missing.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from msvse.config import bounds, to_dict
from msvse.io import atomic_path, write_resolved_config, write_text_atomic
from msvse.twitter import ENTITY_TYPES, Post, entities, format_posts

SPLITS = ("train", "valid", "test")
UNRELATED = "unrelated"
SCENES = (*ENTITY_TYPES, UNRELATED)


@dataclass(frozen=True)
class DemoConfig:
    """The ``demo`` section of ``params.yaml``."""

    seed: int = 13
    out_dir: str = "data/demo"
    train_posts: int = field(default=420, metadata=bounds(min=1))
    valid_posts: int = field(default=90, metadata=bounds(min=1))
    test_posts: int = field(default=90, metadata=bounds(min=1))
    first_id: int = field(default=700001, metadata=bounds(min=1))
    # Shares of posts: with an ambiguous mention, with no entity at all (the rest
    # mention only names whose type never changes).
    ambiguous_rate: float = field(default=0.6, metadata=bounds(min=0, max=1))
    no_entity_rate: float = field(default=0.08, metadata=bounds(min=0, max=1))
    # Chance that a post with an entity gets a second, unambiguous one.
    second_entity_rate: float = field(default=0.3, metadata=bounds(min=0, max=1))
    # Shares of all posts: image unrelated to the text, image referenced but absent.
    unrelated_image_rate: float = field(default=0.1, metadata=bounds(min=0, max=1))
    missing_image_rate: float = field(default=0.02, metadata=bounds(min=0, max=1))
    image_size: int = field(default=224, metadata=bounds(min=32, max=1024))
    jpeg_quality: int = field(default=90, metadata=bounds(min=10, max=95))
    # Standard deviation of the per-pixel Gaussian noise, in 0..255 units.
    pixel_noise: float = field(default=12.0, metadata=bounds(min=0, max=64))

    def __post_init__(self) -> None:
        if self.ambiguous_rate + self.no_entity_rate > 1:
            raise ValueError("ambiguous_rate + no_entity_rate must be <= 1")
        if self.unrelated_image_rate > 1 - self.ambiguous_rate + 1e-9:
            # An unrelated image on an ambiguous post would leave its type undecidable.
            raise ValueError("unrelated_image_rate must be <= 1 - ambiguous_rate (only posts without an ambiguous mention get unrelated images)")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_posts, "valid": self.valid_posts, "test": self.test_posts}


# --------------------------------------------------------------------------- text

# Names whose type depends on the post; each takes every listed type equally often.
AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "Jordan": ("PER", "LOC", "ORG"),
    "Phoenix": ("PER", "LOC", "ORG", "MISC"),
    "Apple": ("PER", "ORG", "MISC"),
    "Paris": ("PER", "LOC", "MISC"),
    "Washington": ("PER", "LOC", "ORG"),
    "Madison": ("PER", "LOC"),
    "Chelsea": ("PER", "LOC", "ORG"),
    "Amazon": ("LOC", "ORG", "MISC"),
    "Georgia": ("PER", "LOC"),
    "Austin": ("PER", "LOC", "ORG"),
    "Dallas": ("LOC", "ORG", "MISC"),
    "Lincoln": ("PER", "LOC", "ORG", "MISC"),
    "Orlando": ("PER", "LOC", "ORG"),
    "Victoria": ("PER", "LOC", "ORG"),
    "Mercury": ("PER", "ORG", "MISC"),
    "Sydney": ("PER", "LOC"),
    "Houston": ("PER", "LOC", "ORG"),
    "Chicago": ("LOC", "ORG", "MISC"),
    "Hamilton": ("PER", "LOC", "MISC"),
    "Tesla": ("PER", "ORG", "MISC"),
    "Ford": ("PER", "ORG", "MISC"),
    "Avatar": ("ORG", "MISC"),
    "Green Bay": ("LOC", "ORG"),
    "New England": ("LOC", "ORG"),
    "Tom Ford": ("PER", "ORG"),
    "Jack Daniels": ("PER", "ORG", "MISC"),
}

# Names that are always the same type.
UNAMBIGUOUS: dict[str, tuple[str, ...]] = {
    "PER": ("Obama", "Taylor Swift", "Justin Bieber", "LeBron James", "Kim Kardashian",
            "Harry Styles", "Beyonce", "Messi", "Oprah", "Eminem", "Lady Gaga"),
    "LOC": ("London", "Texas", "Canada", "Tokyo", "Brooklyn", "Mexico", "California",
            "Los Angeles", "Florida", "Berlin", "Hawaii"),
    "ORG": ("NASA", "Google", "CNN", "Starbucks", "Microsoft", "Real Madrid", "Walmart",
            "BBC", "United Nations", "Netflix", "Manchester United"),
    "MISC": ("Christmas", "Super Bowl", "Olympics", "Grammys", "iPhone", "Game of Thrones",
             "Halloween", "World Cup", "Oscars", "Star Wars", "Coachella"),
}

# Templates for ambiguous names: the only ones they ever appear in, with every type
# equally often, so no word of the post points at the type.
NEUTRAL = (
    "Can't stop thinking about {E} today",
    "{E} is trending again",
    "Everyone is talking about {E} right now",
    "Just saw {E} !!!",
    "Big news about {E} tonight",
    "So much love for {E}",
    "Throwback to {E} last summer",
    "All eyes on {E} this weekend",
    "Thoughts on {E} ?",
    "Wow , {E} .",
    "Still can't believe it : {E}",
    "Nothing beats {E}",
    "{E} on my mind",
    "This picture of {E} though",
    "Look at {E} !",
    "Today is all about {E}",
    "Huge day for {E}",
    "Photo : {E}",
    "Missing {E} already",
    "Here we go , {E} ...",
    "{E} never disappoints",
    "Can we talk about {E} for a second",
)

# Templates that give the type away; used only with unambiguous names.
TYPED = {
    "PER": (
        "Happy birthday {E} !",
        "{E} just posted a new selfie",
        "{E} scored twice last night",
        "Interview with {E} coming up at 9",
        "Congrats to {E} on the award",
        "{E} and her mom at the premiere",
        "Follow {E} on instagram",
    ),
    "LOC": (
        "Flying to {E} tomorrow",
        "Weather in {E} is crazy",
        "Greetings from {E}",
        "Traffic in downtown {E} again",
        "Moving to {E} next month",
        "Beautiful sunset in {E}",
        "Earthquake reported near {E}",
    ),
    "ORG": (
        "{E} shares up 5 % today",
        "{E} announces new CEO",
        "Just applied for a job at {E}",
        "{E} released a statement",
        "Boycott {E}",
        "{E} press conference at noon",
        "{E} is hiring interns",
    ),
    "MISC": (
        "Who is ready for {E} ?",
        "Tickets for {E} sold out",
        "{E} trailer is out",
        "Watching {E} with the family",
        "{E} season is here",
        "Best {E} ever",
        "Counting down the days to {E}",
    ),
}

NO_ENTITY = (
    "Monday again ... send coffee",
    "Best day ever",
    "Cannot sleep",
    "Who wants pizza tonight ?",
    "Finally the weekend !",
    "New post on the blog",
    "This rain though",
    "Good morning everyone",
    "So tired of this",
    "lol this is so true",
    "Guess what happened today",
    "Back to work tomorrow",
)

HANDLES = ("@jess_m", "@newsbot24", "@daily_feed", "@mike_tweets", "@the_real_sam", "@sportsdesk",
           "@ana_b", "@citybuzz", "@trending_now", "@kellyxo", "@tech_daily", "@popculture")
HASHTAGS = ("#mood", "#love", "#news", "#tbt", "#nofilter", "#follow", "#today", "#weekend",
            "#wow", "#breaking", "#photo", "#life", "#fun", "#throwback")
JOINERS = (".", "|", "-", "and", "also")
LINK_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _fill(template: str, name: str, etype: str) -> list[tuple[str, str]]:
    """Template words tagged O, the name's words tagged B-/I- ``etype``."""
    out: list[tuple[str, str]] = []
    for word in template.split():
        if word == "{E}":
            parts = name.split()
            out.append((parts[0], f"B-{etype}"))
            out.extend((p, f"I-{etype}") for p in parts[1:])
        else:
            out.append((word, "O"))
    return out


def _pick(rng: np.random.Generator, items: tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def _decorate(rng: np.random.Generator, body: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Retweet prefix, hashtags and a t.co link, chosen independently of the entities."""
    words = list(body)
    if rng.random() < 0.35:
        words = [("RT", "O"), (_pick(rng, HANDLES), "O"), (":", "O"), *words]
    elif rng.random() < 0.15:
        words.insert(0, (_pick(rng, HANDLES), "O"))
    for _ in range(int(rng.integers(0, 3))):
        words.append((_pick(rng, HASHTAGS), "O"))
    if rng.random() < 0.5:
        code = "".join(LINK_CHARS[i] for i in rng.integers(len(LINK_CHARS), size=10))
        words.append((f"http://t.co/{code}", "O"))
    return words


@dataclass(frozen=True)
class _Draft:
    words: tuple[tuple[str, str], ...]
    scene: str  # an entity type, or UNRELATED
    ambiguous: int  # ambiguous mentions in the post
    missing: bool  # referenced but never written


def _exact_choice(rng: np.random.Generator, pool: list[int], count: int) -> set[int]:
    count = min(count, len(pool))
    return {pool[i] for i in rng.permutation(len(pool))[:count]}


def _draft_split(cfg: DemoConfig, split_index: int, n: int) -> list[_Draft]:
    """The posts of one split. Counts are exact (rounded shares of ``n``), so small
    splits keep their proportions; each split has its own random stream, so changing
    one split's size leaves the others as they were."""
    rng = np.random.default_rng([cfg.seed, split_index])
    n_amb = round(n * cfg.ambiguous_rate)
    n_none = min(round(n * cfg.no_entity_rate), n - n_amb)
    kinds = np.array(["amb"] * n_amb + ["none"] * n_none + ["plain"] * (n - n_amb - n_none))
    kinds = kinds[rng.permutation(n)]

    # Each ambiguous name cycles through its types in a per-split shuffled order, so
    # within the split every name is (up to one) equally often each of its types.
    names = list(AMBIGUOUS)
    type_order = {name: [AMBIGUOUS[name][i] for i in rng.permutation(len(AMBIGUOUS[name]))] for name in names}
    uses: Counter[str] = Counter()
    name_cycle: list[str] = []
    plain_types = [ENTITY_TYPES[i % len(ENTITY_TYPES)] for i in rng.permutation(n)]

    drafts: list[tuple[list[tuple[str, str]], str | None, int]] = []
    for i, kind in enumerate(kinds):
        if kind == "amb":
            if not name_cycle:
                name_cycle = [names[j] for j in rng.permutation(len(names))]
            name = name_cycle.pop()
            etype = type_order[name][uses[name] % len(type_order[name])]
            uses[name] += 1
            body = _fill(_pick(rng, NEUTRAL), name, etype)
            main_type: str | None = etype
        elif kind == "plain":
            etype = plain_types[i]
            name = _pick(rng, UNAMBIGUOUS[etype])
            template = _pick(rng, TYPED[etype]) if rng.random() < 0.6 else _pick(rng, NEUTRAL)
            body = _fill(template, name, etype)
            main_type = etype
        else:
            body = [(w, "O") for w in _pick(rng, NO_ENTITY).split()]
            main_type = None
        if main_type is not None and rng.random() < cfg.second_entity_rate:
            etype2 = _pick(rng, ENTITY_TYPES)
            name2 = _pick(rng, tuple(nm for nm in UNAMBIGUOUS[etype2] if nm != name))
            template2 = _pick(rng, TYPED[etype2]) if rng.random() < 0.6 else _pick(rng, NEUTRAL)
            body = body + [(_pick(rng, JOINERS), "O")] + _fill(template2, name2, etype2)
        drafts.append((_decorate(rng, body), main_type, int(kind == "amb")))

    # Unrelated images go only to posts without an ambiguous mention; a post with no
    # entity that keeps a related image shows a scene of a random type (a photo of
    # someone unnamed, a street, a logo).
    plain_pool = [i for i, k in enumerate(kinds) if k != "amb"]
    unrelated = _exact_choice(rng, plain_pool, round(n * cfg.unrelated_image_rate))
    missing = _exact_choice(rng, list(range(n)), round(n * cfg.missing_image_rate))
    out = []
    for i, (words, main_type, n_ambiguous) in enumerate(drafts):
        if i in unrelated:
            scene = UNRELATED
        elif main_type is None:
            scene = _pick(rng, ENTITY_TYPES)
        else:
            scene = main_type
        out.append(_Draft(tuple(words), scene, n_ambiguous, i in missing))
    return out


# ------------------------------------------------------------------------- images


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], spread: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-spread, spread, size=3), 0, 255)


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _draw_per(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, s: int) -> None:
    # Warm backdrop, then a large head-over-body figure filling much of the frame.
    top, bottom = _jitter(rng, (235, 150, 110), 20), _jitter(rng, (200, 80, 70), 20)
    t = (yy / s)[..., None]
    img[:] = top * (1 - t) + bottom * t
    r = s * rng.uniform(0.12, 0.19)
    cx = s * rng.uniform(0.3, 0.7)
    cy = s * rng.uniform(0.22, 0.4)
    half = r * rng.uniform(1.1, 1.6)
    body = (yy >= cy + 0.8 * r) & (np.abs(xx - cx) <= half + (yy - cy) * 0.25)
    img[body] = _jitter(rng, (190, 30, 40), 25)
    img[_disc(yy, xx, cy, cx, r)] = _jitter(rng, (228, 182, 150), 15)


def _draw_loc(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, s: int) -> None:
    # Blue sky band over green or brown ground, with a hilly horizon.
    sky_hi, sky_lo = _jitter(rng, (70, 130, 225), 20), _jitter(rng, (150, 195, 245), 15)
    ground = _jitter(rng, (70, 150, 60) if rng.random() < 0.6 else (140, 110, 70), 20)
    horizon = s * rng.uniform(0.38, 0.58) + s * rng.uniform(0.02, 0.08) * np.sin(
        xx[0] / s * rng.uniform(3, 9) + rng.uniform(0, 6.3)
    )
    t = np.clip(yy / s / 0.6, 0, 1)[..., None]
    img[:] = sky_hi * (1 - t) + sky_lo * t
    below = yy >= horizon[None, :]
    shade = (1 - 0.35 * (yy - horizon[None, :]) / s)[..., None]
    img[below] = (ground * shade)[below]
    if rng.random() < 0.5:
        img[_disc(yy, xx, s * rng.uniform(0.08, 0.2), s * rng.uniform(0.1, 0.9), s * rng.uniform(0.04, 0.07))] = _jitter(
            rng, (250, 240, 190), 5
        )


def _draw_org(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, s: int) -> None:
    # Flat grey wall with a bold checkered logo of yellow and black squares.
    grey = rng.uniform(110, 170)
    img[:] = np.array([grey, grey, grey], dtype=np.float32) + rng.uniform(-6, 6, size=3)
    cells = int(rng.integers(2, 4))
    side = s * rng.uniform(0.42, 0.65)
    y0 = rng.uniform(0, s - side)
    x0 = rng.uniform(0, s - side)
    yellow, black = _jitter(rng, (245, 205, 20), 10), _jitter(rng, (20, 20, 25), 10)
    cell = side / cells
    inside = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
    parity = (np.floor((yy - y0) / cell) + np.floor((xx - x0) / cell)) % 2 == 0
    img[inside & parity] = yellow
    img[inside & ~parity] = black


def _draw_misc(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, s: int) -> None:
    # Purple field crossed by diagonal stripes of a lighter violet.
    base, stripe = _jitter(rng, (115, 45, 160), 15), _jitter(rng, (205, 120, 235), 15)
    period = rng.uniform(18, 42)
    direction = 1 if rng.random() < 0.5 else -1
    phase = rng.uniform(0, period)
    on = ((xx + direction * yy + phase) % period) < period * rng.uniform(0.35, 0.6)
    img[:] = base
    img[on] = stripe


def _draw_unrelated(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, s: int) -> None:
    # Blurry, nearly colourless noise: a scene that matches none of the types.
    coarse = rng.uniform(40, 215, size=(6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32)
    tint = rng.uniform(-8, 8, size=3).astype(np.float32)
    img[:] = smooth[..., None] + tint


_PAINTERS = {"PER": _draw_per, "LOC": _draw_loc, "ORG": _draw_org, "MISC": _draw_misc, UNRELATED: _draw_unrelated}


def render_image(scene: str, seed: int, image_id: int, size: int, noise: float) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of ``scene``; the same arguments always give
    the same pixels (each image has its own random stream)."""
    rng = np.random.default_rng([seed, 1, image_id])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size, 3), dtype=np.float32)
    _PAINTERS[scene](rng, img, yy, xx, size)
    # Small clutter in random colours so that no image is a clean template.
    for _ in range(int(rng.integers(2, 6))):
        r = size * rng.uniform(0.02, 0.06)
        img[_disc(yy, xx, rng.uniform(0, size), rng.uniform(0, size), r)] = rng.uniform(0, 255, size=3)
    img *= rng.uniform(0.88, 1.12)
    img += rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------- driver


def generate_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Write the demo data set under ``cfg.out_dir`` and return its summary counts.

    Outputs: ``{train,valid,test}.txt`` (Twitter format), ``images/<id>.jpg``,
    ``scenes.tsv`` (id, split, scene, written) and ``config.json`` (resolved config,
    summary, provenance). Images left from an earlier run that this run does not
    reference are removed, so the folder always matches the text files.
    """
    out = Path(cfg.out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    next_id = cfg.first_id
    summary: dict[str, Any] = {}
    scene_rows = ["image_id\tsplit\tscene\twritten\n"]
    written: set[str] = set()
    for split_index, (split, n) in enumerate(cfg.split_sizes().items()):
        drafts = _draft_split(cfg, split_index, n)
        posts = []
        for draft in drafts:
            image_id = next_id
            next_id += 1
            posts.append(Post(str(image_id), tuple(w for w, _ in draft.words), tuple(t for _, t in draft.words)))
            scene_rows.append(f"{image_id}\t{split}\t{draft.scene}\t{int(not draft.missing)}\n")
            if draft.missing:
                continue
            pixels = render_image(draft.scene, cfg.seed, image_id, cfg.image_size, cfg.pixel_noise)
            name = f"{image_id}.jpg"
            with atomic_path(images / name) as tmp:
                tmp.write_bytes(encode_jpeg(pixels, cfg.jpeg_quality))
            written.add(name)
        write_text_atomic(out / f"{split}.txt", format_posts(posts))
        summary[split] = _split_summary(posts, drafts)
    for stale in images.glob("*.jpg"):
        if stale.name not in written:
            stale.unlink()
    write_text_atomic(out / "scenes.tsv", "".join(scene_rows))
    mentions = sum(s["entities"] for s in summary.values())
    ambiguous = sum(s["ambiguous_mentions"] for s in summary.values())
    summary["ambiguous_share"] = round(ambiguous / mentions, 4) if mentions else 0.0
    write_resolved_config(out / "config.json", "demo", to_dict(cfg), summary=summary)
    return summary


def _split_summary(posts: list[Post], drafts: list[_Draft]) -> dict[str, int]:
    types: Counter[str] = Counter(e.type for p in posts for e in entities(p.tags))
    scenes: Counter[str] = Counter(d.scene for d in drafts)
    row = {
        "posts": len(posts),
        "tokens": sum(len(p.tokens) for p in posts),
        **{t: types[t] for t in ENTITY_TYPES},
        "entities": sum(types.values()),
        "ambiguous_mentions": sum(d.ambiguous for d in drafts),
        "images_written": sum(not d.missing for d in drafts),
        "images_missing": sum(d.missing for d in drafts),
        "images_unrelated": scenes[UNRELATED],
    }
    return row
