"""sida_edm2 package."""
