"""What operators see: rollup queries, alert rules, consumer lag, and the dashboard page.

The stack process owns the embedded ClickHouse (chdb), so it also serves the page
(`server.DashboardServer`) and runs the lag probe and alert loop (`monitor.Monitor`).
"""
