"""fxopt"""
