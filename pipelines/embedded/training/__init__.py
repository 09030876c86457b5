"""Training the embedded model from scratch: the domain CLIP, then the VAE, then the UNet.

One module per part: `settings` (the recipe), `data` (rendered batches), `clip`, `vae`,
`unet` (each builds its network and trains it), `assemble` (the diffusers pipeline and how
it is saved) and `stages` (the order they run in, and what each loads from and writes to
the output directory). `jobs/train_embedded.py` is the command line.
"""
