"""Turn a bundle into formats other runtimes load (LiteRT for phone apps); scoring never imports this."""
