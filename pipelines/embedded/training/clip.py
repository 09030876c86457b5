"""The domain CLIP: a small transformers CLIPModel trained contrastively on renders.

It is both the evaluation's `embedded` feature extractor and, through its frozen text
tower, the generator's text encoder, so it is trained first.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evals import shapes as domain
from pipelines.embedded.training.data import batches, images_to_model_input
from pipelines.embedded.training.settings import Settings, warmup_cosine

TOKEN_LENGTH = 32  # longest caption is 18 tokens with BOS/EOS
TEXT_DIM = 128  # the text tower's width: the UNet's cross_attention_dim


def build_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH,
                         projection_dim=64, **ids),
        vision_config=dict(image_size=domain.IMAGE_SIZE, patch_size=8, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=3, num_attention_heads=4, projection_dim=64),
        projection_dim=64,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids.values()
    return CLIPModel(config)


def build_processor(tokenizer):
    """The CLIPProcessor saved with the model: 64x64 images, mean and std 0.5 (so [-1, 1])."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    s = domain.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tokenize(tokenizer, captions, device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def contrastive_loss(out, captions, device) -> torch.Tensor:
    """Symmetric InfoNCE. Identical captions can land in one batch: every match counts as a positive."""
    same = torch.tensor([[a == b for b in captions] for a in captions], device=device, dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(out.logits_per_image, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(out.logits_per_text, 1), 1).mean())


def train_clip(clip, tokenizer, s: Settings, seed: int, device):
    clip.to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=s.clip_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(s.clip_steps))
    data = batches(seed + 1, s.clip_batch)
    bar = tqdm(range(s.clip_steps), desc="clip", mininterval=5)
    for step in bar:
        captions, images = next(data)
        out = clip(input_ids=tokenize(tokenizer, captions, device), pixel_values=images_to_model_input(images, device))
        loss = contrastive_loss(out, captions, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            acc = (out.logits_per_image.argmax(1) == torch.arange(len(captions), device=device)).float().mean()
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{acc.item():.2f}")
    return clip.eval()


def frozen_text_tower(clip_dir: Path, device):
    """The saved CLIP's text tower as a CLIPTextModel: the generator's text encoder, frozen."""
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.to(device).eval().requires_grad_(False)
