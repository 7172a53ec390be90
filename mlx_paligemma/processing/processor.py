"""Images and text in, model inputs out: the PaliGemma prompt format, the tokenizer and image preprocessing.

Matches transformers' PaliGemmaProcessor with its PIL image backend id for id and pixel for pixel.
"""

import re
import reprlib
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from ..errors import InputError, cause, check_text, read_json_object
from .images import ImageInput, load_image, to_rgb

IMAGE_TOKEN = "<image>"


class Tokenizer:
    """Gemma's tokenizer from `tokenizer.json` (the file transformers itself reads) or `tokenizer.model`."""

    def __init__(self, folder: Path):
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            file = folder / "tokenizer.json"
            try:
                tok = HFTokenizer.from_file(str(file))
            except Exception as e:  # the tokenizers library raises a bare Exception
                raise InputError(f"cannot read {file}: {cause(e)}") from None
            self._encode = lambda s: tok.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
            self.piece_to_id = tok.token_to_id
            self.id_to_piece = tok.id_to_token
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
            control = {}  # the tokenizers library finds its added tokens in text itself
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece as spm

            file = folder / "tokenizer.model"
            try:
                sp = spm.SentencePieceProcessor(model_file=str(file))
            except Exception as e:
                raise InputError(f"cannot read {file}: {cause(e)}") from None
            self._encode = sp.encode
            self._decode = sp.decode

            def piece_to_id(piece):
                i = sp.piece_to_id(piece)
                return None if i == sp.unk_id() and piece != "<unk>" else i

            self.piece_to_id = piece_to_id
            self.id_to_piece = sp.id_to_piece
            self.vocab_size = sp.get_piece_size()
            # sentencepiece reads control pieces written in text (<unk>, ...) as characters; transformers' tokenizer
            # converted from this file makes them special tokens.
            control = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        else:
            raise InputError(f"no tokenizer.json or tokenizer.model in {folder}")
        self.pad_id, self.eos_id, self.bos_id = (self.piece_to_id(p) for p in ("<pad>", "<eos>", "<bos>"))
        for piece, i in (("<pad>", self.pad_id), ("<eos>", self.eos_id), ("<bos>", self.bos_id)):
            if i is None:
                raise InputError(f"{file} has no {piece} token: not a PaliGemma tokenizer")
        # <image> follows the sentencepiece vocabulary when a tokenizer file does not list it.
        self.image_id = self.piece_to_id(IMAGE_TOKEN)
        if self.image_id is None:
            self.image_id = self.vocab_size
            self.vocab_size += 1
        self.specials = {"<bos>": self.bos_id, "<eos>": self.eos_id, "<pad>": self.pad_id, IMAGE_TOKEN: self.image_id}
        self._written = {**control, **self.specials}
        self._skipped = frozenset(self.specials.values())  # decode's, per token of every answer
        # Longest first: at one position the longest special token wins, as in the tokenizers library.
        pieces = sorted(self._written, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in pieces) + ")")

    def encode(self, text: str) -> List[int]:
        """Ids of `text`, where special tokens written out in it (<bos>, <image>, ...) become their ids."""
        ids = []
        for part in self._split.split(text):
            if part in self._written:
                ids.append(self._written[part])
            elif part:
                ids.extend(self._encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Special and padded-vocabulary ids (the embedding has more rows than the tokenizer has pieces) print as
        # nothing.
        skip, vocab = self._skipped, self.vocab_size
        return self._decode([i for i in map(int, ids) if i not in skip and 0 <= i < vocab])


def check_processor_keywords(return_tensors, padding, unknown: dict) -> None:
    """transformers' keywords where their meaning here is unambiguous; anything else is one line naming the right
    form, never a TypeError."""
    if unknown:
        raise InputError(f"processor() got unknown keyword {', '.join(sorted(unknown))}; known keywords: images, "
                         "text, suffix, return_tensors, padding")
    if return_tensors not in ("mlx", "np"):
        raise InputError(f"return_tensors={return_tensors!r} is not supported: give return_tensors=\"mlx\" "
                         "(mx arrays, the default) or \"np\" (numpy arrays)")
    if padding is not True and padding != "longest":
        raise InputError(f"padding={padding!r} is not supported: prompts are always left-padded to the longest "
                         "(padding=\"longest\" or True)")


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
        settings, file = {}, None
        if (folder / "processor_config.json").is_file():
            file = folder / "processor_config.json"
            settings = read_json_object(file).get("image_processor", {})
            if not isinstance(settings, dict):
                raise InputError(f"{file}: 'image_processor' must be an object, got {reprlib.repr(settings)}")
        if not settings and (folder / "preprocessor_config.json").is_file():
            file = folder / "preprocessor_config.json"
            settings = read_json_object(file)

        def setting(key, valid, what):
            value = settings.get(key)
            if value is not None and not valid(value):
                raise InputError(f"{file}: {key!r} must be {what}, got {reprlib.repr(value)}")
            return value

        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        def positive_int(x):
            return isinstance(x, int) and not isinstance(x, bool) and x > 0

        def per_channel(x):
            return number(x) or (isinstance(x, list) and len(x) == 3 and all(map(number, x)))

        def square(x):  # PaliGemma's images are square
            return isinstance(x, dict) and positive_int(x.get("height")) and x.get("width", x["height"]) == x["height"]

        vision = config.vision_config if config is not None else None
        size = setting("size", square, 'a square size {"height": N, "width": N}')
        size = size["height"] if size else (vision.image_size if vision else 224)
        seq = setting("image_seq_length", positive_int, "a positive integer")
        seq = seq or (vision.num_patches if vision else (size // 14) ** 2)
        mean = setting("image_mean", per_channel, "a number or a list of 3 numbers")
        std = setting("image_std", per_channel, "a number or a list of 3 numbers")
        rescale = setting("rescale_factor", number, "a number")
        tokenizer = Tokenizer(folder)
        if vision is not None:  # the processor's files must describe the model they sit beside
            if (size, seq) != (vision.image_size, vision.num_patches):
                raise InputError(f"{file or folder}: images of {size} px in {seq} tokens, but config.json's vision "
                                 f"model takes {vision.image_size} px in {vision.num_patches} tokens")
            if tokenizer.image_id != config.image_token_index:
                raise InputError(f"{folder}: the tokenizer's <image> token is {tokenizer.image_id}, config.json's "
                                 f"image_token_index is {config.image_token_index}")
        return cls(
            tokenizer, size, seq,
            image_mean=(0.5, 0.5, 0.5) if mean is None else mean,
            image_std=(0.5, 0.5, 0.5) if std is None else std,
            rescale_factor=1 / 255 if rescale is None else rescale,
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

    def _images_per_prompt(self, images, texts: List[str]) -> List[list]:
        if images is None:
            raise InputError("PaliGemma needs images: got none")
        if not isinstance(images, (list, tuple)):
            return [[images] for _ in texts]
        nested = [isinstance(i, (list, tuple)) for i in images]
        markers = [t.count(IMAGE_TOKEN) for t in texts]
        if all(nested):
            per_prompt = [list(i) for i in images]
        elif any(nested):
            raise InputError("images must be an image, a list of images or a list of lists of images, not a mix")
        elif any(markers):
            # transformers' reading of a flat list: the images fill the markers of all prompts in order.
            if sum(markers) != len(images):
                raise InputError(f"the prompts have {sum(markers)} <image> markers but {len(images)} images were given")
            ends = np.cumsum(markers).tolist()
            per_prompt = [list(images[end - m:end]) for m, end in zip(markers, ends)]
        elif len(texts) == 1:
            per_prompt = [list(images)]
        elif len(images) == len(texts):
            per_prompt = [[i] for i in images]
        else:
            raise InputError(f"got {len(images)} images for {len(texts)} prompts without <image> markers: "
                             "give one image per prompt or a list of images per prompt")
        if not any(per_prompt):
            raise InputError("PaliGemma needs images: got an empty list")
        if len(per_prompt) != len(texts):
            raise InputError(f"got {len(per_prompt)} lists of images for {len(texts)} prompts")
        return per_prompt

    def __call__(self, images=None, text: Union[str, List[str], None] = None,
                 suffix: Union[str, List[str], None] = None, return_tensors: str = "mlx",
                 padding: Union[bool, str] = "longest", **unknown) -> dict:
        """Model inputs as mx arrays: input_ids, attention_mask, token_type_ids (B, L) int32, left padded;
        pixel_values (N, H, W, 3) float32 for all images in order; with a suffix, labels (-100 on the prefix).
        `return_tensors="np"` gives numpy arrays instead; padding is always to the longest prompt, as
        transformers' `padding="longest"` (or True).

        transformers' forms, with its outputs: an image for one prompt; a list with one image per prompt; a list of
        lists, one per prompt (an empty one: a prompt without image); with `<image>` markers written in the prompts,
        a flat list that fills them in order. Beyond them, with the outputs transformers gives for the explicit
        list of lists: one image for every prompt; a flat list all for a single prompt without markers; in a list of
        lists, prompts without markers beside prompts with them (their images go first, as if written); text None,
        the empty prompt. The markers of a prompt must match its list of images; a suffix holds no `<image>`.
        """
        check_processor_keywords(return_tensors, padding, unknown)
        if text is None:
            texts = [""]
        elif isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise InputError("text must be a string or a list of strings")
        if not texts:
            raise InputError("no prompts: text is an empty list")
        for i, prompt in enumerate(texts):
            check_text(prompt, f"prompt {i}")
        suffixes = None
        if suffix is not None:
            if isinstance(suffix, str):
                suffixes = [suffix]
            elif isinstance(suffix, (list, tuple)) and all(isinstance(s, str) for s in suffix):
                suffixes = list(suffix)
            else:
                raise InputError("suffix must be a string or a list of strings")
            if len(suffixes) != len(texts):
                raise InputError(f"got {len(suffixes)} suffixes for {len(texts)} prompts")
            for i, s in enumerate(suffixes):
                check_text(s, f"suffix {i}")
                if IMAGE_TOKEN in s:
                    raise InputError(f"suffix {i} {reprlib.repr(s)} contains {IMAGE_TOKEN}: images go in the prompt")
        per_prompt = self._images_per_prompt(images, texts)

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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "pixel_values": pixel_values}
        if suffixes is not None:
            batch["labels"] = np.where(token_type_ids == 1, input_ids, -100).astype(np.int32)
        return batch if return_tensors == "np" else {k: mx.array(v) for k, v in batch.items()}

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(np.asarray(token_ids).reshape(-1).tolist())

    def batch_decode(self, sequences) -> List[str]:
        return [self.decode(s) for s in sequences]
