"""Images and text in, model inputs out: the PaliGemma prompt format, the tokenizer and image preprocessing.

Matches transformers' PaliGemmaProcessor with its PIL image backend id for id and pixel for pixel.
"""

import io
import json
import re
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from PIL import Image

IMAGE_TOKEN = "<image>"

ImageInput = Union[Image.Image, str, Path]


class InputError(ValueError):
    """Bad user input (image, prompt, folder): the message is one line that names the problem."""


def load_image(source: ImageInput) -> Image.Image:
    """A PIL image from a PIL image, a file path or an http(s) URL, fully decoded so a damaged file fails here."""
    if isinstance(source, Image.Image):
        return source
    source = str(source)
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as response:
                image = Image.open(io.BytesIO(response.read()))
        else:
            if not Path(source).is_file():
                raise InputError(f"image not found: {source}")
            image = Image.open(source)
        image.load()
    except InputError:
        raise
    except Exception as e:  # PIL and urllib raise many types; the user needs only the cause
        raise InputError(f"cannot read image {source}: {str(e) or type(e).__name__}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    # Transparency is composited onto white, as transformers does.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


class Tokenizer:
    """Gemma's tokenizer from `tokenizer.json` (the file transformers itself reads) or `tokenizer.model`."""

    def __init__(self, folder: Path):
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self._encode = lambda s: tok.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
            self.piece_to_id = tok.token_to_id
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._encode = sp.encode
            self._decode = sp.decode

            def piece_to_id(piece):
                i = sp.piece_to_id(piece)
                return None if i == sp.unk_id() and piece != "<unk>" else i

            self.piece_to_id = piece_to_id
            self.vocab_size = sp.get_piece_size()
        else:
            raise InputError(f"no tokenizer.json or tokenizer.model in {folder}")
        self.pad_id, self.eos_id, self.bos_id = (self.piece_to_id(p) for p in ("<pad>", "<eos>", "<bos>"))
        # <image> follows the sentencepiece vocabulary when a tokenizer file does not list it.
        self.image_id = self.piece_to_id(IMAGE_TOKEN)
        if self.image_id is None:
            self.image_id = self.vocab_size
            self.vocab_size += 1
        self.specials = {"<bos>": self.bos_id, "<eos>": self.eos_id, "<pad>": self.pad_id, IMAGE_TOKEN: self.image_id}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    def encode(self, text: str) -> List[int]:
        """Ids of `text`, where special tokens written out in it (<bos>, <image>, ...) become their ids."""
        ids = []
        for part in self._split.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self._encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Special and padded-vocabulary ids (the embedding has more rows than the tokenizer has pieces) print as nothing.
        skip = set(self.specials.values())
        return self._decode([int(i) for i in ids if int(i) not in skip and 0 <= int(i) < self.vocab_size])


class PaliGemmaProcessor:
    def __init__(self, tokenizer: Tokenizer, image_size: int, image_seq_length: int,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255,
                 max_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_seq_length = image_seq_length
        self.image_mean = np.array(image_mean, np.float32)
        self.image_std = np.array(image_std, np.float32)
        self.rescale_factor = rescale_factor
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, folder, config=None) -> "PaliGemmaProcessor":
        """Reads `processor_config.json` (nested, newer) or `preprocessor_config.json` (flat, older);
        with neither, uses the model config's image size and PaliGemma's normalisation."""
        folder = Path(folder)
        settings = {}
        if (folder / "processor_config.json").is_file():
            settings = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
        if not settings and (folder / "preprocessor_config.json").is_file():
            settings = json.loads((folder / "preprocessor_config.json").read_text())
        vision = config.vision_config if config is not None else None
        size = settings.get("size", {}).get("height") or (vision.image_size if vision else 224)
        seq = settings.get("image_seq_length") or (vision.num_patches if vision else (size // 14) ** 2)
        return cls(
            Tokenizer(folder), size, seq,
            image_mean=settings.get("image_mean", (0.5, 0.5, 0.5)),
            image_std=settings.get("image_std", (0.5, 0.5, 0.5)),
            rescale_factor=settings.get("rescale_factor", 1 / 255),
            max_length=config.text_config.max_position_embeddings if config is not None else None,
        )

    def preprocess_image(self, image: ImageInput) -> np.ndarray:
        """(H, W, 3) float32 in [-1, 1]: RGB, bicubic resize to a square, rescale, normalise."""
        image = to_rgb(load_image(image)).resize((self.image_size, self.image_size), Image.BICUBIC)
        # Same float steps as transformers: rescale in float64, then normalise in float32.
        pixels = (np.asarray(image, np.float64) * self.rescale_factor).astype(np.float32)
        return (pixels - self.image_mean) / self.image_std

    def build_prompt(self, prompt: str, n_images: int) -> str:
        """The prefix: images, bos, prompt, newline. `<image>` markers already in the prompt are kept in place."""
        if IMAGE_TOKEN not in prompt:
            return IMAGE_TOKEN * n_images + "<bos>" + prompt + "\n"
        end = prompt.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)
        return prompt[:end] + "<bos>" + prompt[end:] + "\n"

    def _images_per_prompt(self, images, n_prompts: int) -> List[list]:
        # The nesting rules of transformers: one image for every prompt, one image per prompt, or a list per prompt.
        if images is None:
            raise InputError("PaliGemma needs at least one image per prompt")
        if not isinstance(images, (list, tuple)):
            return [[images]] * n_prompts
        if all(isinstance(i, (list, tuple)) for i in images):
            nested = [list(i) for i in images]
        elif n_prompts == 1 and len(images) > 1:
            nested = [list(images)]
        else:
            nested = [[i] for i in images]
        if len(nested) != n_prompts:
            raise InputError(f"got images for {len(nested)} prompts but {n_prompts} prompts")
        return nested

    def __call__(self, images=None, text: Union[str, List[str], None] = None,
                 suffix: Union[str, List[str], None] = None) -> dict:
        """Model inputs as mx arrays: input_ids, attention_mask, token_type_ids (B, L) int32, left padded;
        pixel_values (N, H, W, 3) float32 for all images in order; with a suffix, labels (-100 on the prefix)."""
        texts = [text] if isinstance(text, str) or text is None else list(text)
        texts = ["" if t is None else t for t in texts]
        per_prompt = self._images_per_prompt(images, len(texts))
        suffixes = None
        if suffix is not None:
            suffixes = [suffix] if isinstance(suffix, str) else list(suffix)
            if len(suffixes) != len(texts):
                raise InputError(f"got {len(suffixes)} suffixes for {len(texts)} prompts")

        rows, types = [], []
        for i, (prompt, imgs) in enumerate(zip(texts, per_prompt)):
            prefix = self.build_prompt(prompt, len(imgs))
            if prefix.count(IMAGE_TOKEN) != len(imgs):
                raise InputError(
                    f"prompt {i} has {prefix.count(IMAGE_TOKEN)} <image> markers but {len(imgs)} images were given"
                )
            prefix = prefix.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length)
            ids = self.tokenizer.encode(prefix)
            n_prefix = len(ids)
            if suffixes is not None:
                ids += self.tokenizer.encode(suffixes[i] + "<eos>")
            if self.max_length is not None and len(ids) > self.max_length:
                raise InputError(f"prompt {i} is {len(ids)} tokens long, more than the model's {self.max_length}")
            rows.append(ids)
            types.append([0] * n_prefix + [1] * (len(ids) - n_prefix))

        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id
        input_ids = np.array([[pad] * (length - len(r)) + r for r in rows], np.int32)
        attention_mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int32)
        token_type_ids = np.array([[0] * (length - len(t)) + t for t in types], np.int32)
        pixel_values = np.stack([self.preprocess_image(im) for imgs in per_prompt for im in imgs])
        batch = {
            "input_ids": mx.array(input_ids),
            "attention_mask": mx.array(attention_mask),
            "token_type_ids": mx.array(token_type_ids),
            "pixel_values": mx.array(pixel_values),
        }
        if suffixes is not None:
            batch["labels"] = mx.array(np.where(token_type_ids == 1, input_ids, -100).astype(np.int32))
        return batch

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(np.asarray(token_ids).reshape(-1).tolist())

    def batch_decode(self, sequences) -> List[str]:
        return [self.decode(s) for s in sequences]
