"""LLM providers behind one interface, and the fallback chain that supervises them."""
