"""The EDM2 networks: magnitude-preserving layers, weight normalisation, presets, speed switches."""
