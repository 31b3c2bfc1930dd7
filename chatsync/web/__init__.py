"""The optional HTTP API (`chatsync serve`, the ``api`` extra). The core never imports this package."""
