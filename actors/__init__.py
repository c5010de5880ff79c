"""The WhatsApp domain: conversation actors and the shared supervisors (LLM, outbound, CRM)."""
