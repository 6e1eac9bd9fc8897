"""The dpfl ClientApp: local DP-SGD training and the client's privacy ledger."""
