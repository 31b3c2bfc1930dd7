"""chatsync: Chatbase conversations in your own database, with the WhatsApp numbers users typed."""

__version__ = "0.1.0"
