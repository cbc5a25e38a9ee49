"""Network import and export: EDM2 / SiDA pickles, safetensors exports, the safe unpickler."""
