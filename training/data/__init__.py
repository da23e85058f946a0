"""Face training-set builder (`build_dataset`), its archive format and loader (`archive`), label maps (`masks`) and
horizontal-flip rules for every label (`flip`). See DATASET.md for the generated dataset card."""
