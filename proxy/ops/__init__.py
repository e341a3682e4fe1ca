"""Operations: metrics, logs, sd_notify, workers, reload."""
